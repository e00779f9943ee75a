#!/bin/bash
# The same command on HOSTS hosts, the SSH-push way and the fleetadm way, side by side in one run.
# A lab of HOSTS hosts (network + mount + UTS namespaces on a private bridge, one node-agent
# each, release builds); OpenSSH's sshd (Debian's package) listening in each host's network
# namespace with key authentication, logging in as a user whose shell is /bin/sh (so no shell
# start-up file of this machine's root weighs on the SSH side). Each round runs `true` on every
# host at once: once with one ssh connection per host, all started together (what SSH-push
# installers such as sealos do),
# once with `controller exec -l lab=yes --max-parallel HOSTS -- true` through the agents' own
# connections. Prints each round's wall time and the ratio; asserts nothing.
# usage: tests/bench/ssh-vs-fleetadm.sh [HOSTS] [ROUNDS]      (root; traffic stays on the lab bridge)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:-100} rounds=${2:-3}
cd "$root"
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  echo "installing openssh-server (its own service is not wanted here)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq openssh-server openssh-client >/dev/null
  (systemctl disable --now ssh || service ssh stop) >/dev/null 2>&1 || true
fi
cargo build --release --locked -q -p controller -p node-agent -p fleetadm-tests --bin controller --bin node-agent --bin kubeadm-sim
export LAB_DIR=/tmp/fleetadm-sshbench LAB_HOSTS=$n FLEETADM_BIN_DIR=$root/target/release
lab() { tests/lab/lab.sh "$@"; }
dir=$LAB_DIR-ssh
sshd_pids=()
user=fleetbench made_user=no
cleanup() {
  for p in "${sshd_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ "$made_user" = no ] || userdel "$user" 2>/dev/null || true
  lab down >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
lab up >/dev/null
rm -rf "$dir" && mkdir -p "$dir" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$dir/client"
ssh-keygen -q -t ed25519 -N '' -f "$dir/hostkey"
cp "$dir/client.pub" "$dir/authorized_keys"
cat > "$dir/sshd_config" <<EOF
HostKey $dir/hostkey
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
LogLevel ERROR
EOF
if ! id "$user" >/dev/null 2>&1; then
  useradd -M -d / -s /bin/sh "$user" && made_user=yes
  # no password, but not locked (sshd refuses keys for locked accounts without PAM)
  usermod -p '*' "$user"
fi
sshd=$(command -v sshd || echo /usr/sbin/sshd)
for i in $(seq 1 "$n"); do
  ip netns exec "flab-h$i" "$sshd" -D -f "$dir/sshd_config" -o "ListenAddress=10.78.0.$((10 + i))" &
  sshd_pids+=($!)
done
for i in $(seq 1 "$n"); do
  for _ in $(seq 100); do
    timeout 1 bash -c "exec 3<>/dev/tcp/10.78.0.$((10 + i))/22" 2>/dev/null && break
    sleep 0.1
  done
done
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ssh_round() {
  rm -f "$dir"/rc.*
  local t0; t0=$(now_ms)
  for i in $(seq 1 "$n"); do
    ( rc=0; ssh -q -i "$dir/client" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
        -o ConnectTimeout=60 "$user@10.78.0.$((10 + i))" true </dev/null || rc=$?; echo $rc > "$dir/rc.$i" ) &
  done
  wait
  local t1; t1=$(now_ms)
  # a host without a result counts as failed
  local ok; ok=$(cat "$dir"/rc.* 2>/dev/null | grep -cx 0 || true)
  echo "$((t1 - t0)) $((n - ok))"
}
fleet_round() {
  local t0; t0=$(now_ms)
  local out; out=$(lab ctl exec -l lab=yes --max-parallel "$n" -- true 2>&1) && rc=0 || rc=$?
  local t1; t1=$(now_ms)
  local failed; failed=$(grep -c ' | ! ' <<<"$out" || true)
  [ "$rc" -eq 0 ] || failed=${failed:-?}
  echo "$((t1 - t0)) $failed"
}
echo "ssh-vs-fleetadm: \`true\` on $n hosts at once, $rounds rounds (release builds, $(nproc) cores)"
printf '%-7s %18s %22s %8s\n' round "ssh (ms, failed)" "fleetadm (ms, failed)" ratio
ssh_all=() fa_all=()
for r in $(seq 1 "$rounds"); do
  read -r s sf < <(ssh_round)
  read -r f ff < <(fleet_round)
  ssh_all+=("$s") fa_all+=("$f")
  printf '%-7s %12s (%3s) %16s (%3s) %8s\n' "$r" "$s" "$sf" "$f" "$ff" "$(awk -v a="$f" -v b="$s" 'BEGIN{printf "%.2f", a/b}')"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
ms=$(median "${ssh_all[@]}") mf=$(median "${fa_all[@]}")
echo "median: ssh ${ms} ms, fleetadm ${mf} ms: fleetadm/ssh = $(awk -v a="$mf" -v b="$ms" 'BEGIN{printf "%.2f", a/b}')"
