#!/bin/bash
# A local lab fleet: one controller and N hosts, each host a network namespace (own address on a
# private bridge) plus a mount and UTS namespace (own hostname, /etc/hosts, /etc/machine-id,
# /etc/kubernetes, /var/lib/kubelet, /var/lib/etcd), running node-agent as it runs on a machine.
# The Kubernetes binaries are the test-only kubeadm simulator (tests/src/bin/kubeadm-sim.rs).
#
# usage: tests/lab/lab.sh up        build nothing; start controller + agents, enroll, wait
#        tests/lab/lab.sh down      stop everything, remove namespaces and the lab directory
#        tests/lab/lab.sh ctl ARGS  run `controller ARGS` against the lab controller
#        tests/lab/lab.sh on HOST CMD...   run a command inside a lab host
#        tests/lab/lab.sh start-agent|stop-agent HOST, kill-controller, start-controller,
#                         restart-proxy, restart-relay
# env:   LAB_HOSTS (5)  LAB_DIR (/tmp/fleetadm-lab)  FLEETADM_BIN_DIR (target/debug)
#        LAB_PEERS=1: agents serve bundle blobs to each other (--peer-listen 0.0.0.0:7451).
#        LAB_BUNDLE=1: hosts start without kubeadm (it comes from a bundle); otherwise kubeadm is
#        preinstalled on every host. Each host has its own /usr/local/bin, /etc/systemd/system,
#        /etc/modules-load.d, /etc/sysctl.d and /etc/fstab; kernel modules and the host's systemd
#        are shared with the machine running the lab.
# Needs root, iproute2, util-linux (unshare, mount). Traffic stays on the lab bridge.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEETADM_BIN_DIR:-$root/target/debug}
lab=${LAB_DIR:-/tmp/fleetadm-lab}
n=${LAB_HOSTS:-5}
br=flab0
net=10.78.0
ctl_addr=$net.1:9443
# LAB_BASTION=proxy|relay: the hosts reach only a bastion namespace ($net.254, IP forwarding off);
# the controller listens on the far side of the bastion (10.79.0.1), which the hosts have no
# route to. proxy: the bastion runs tinyproxy; agents enroll with --proxy and run with
# HTTPS_PROXY. relay: the bastion runs `controller relay` (registered with the controller before
# anyone enrolls); agents dial the relay's address, $net.254:9443.
bastion=${LAB_BASTION:-}
case "$bastion" in ""|proxy|relay) ;; *) echo "lab: LAB_BASTION must be proxy or relay" >&2; exit 2 ;; esac
proxy=; [ "$bastion" = proxy ] && proxy=http://$net.254:3128
[ -n "$bastion" ] && ctl_addr=10.79.0.1:9443
# The address agents dial: the controller's, or the relay's.
agent_addr=$ctl_addr
[ "$bastion" = relay ] && agent_addr=$net.254:9443
relay_metrics=10.79.0.2:9101

host_dir() { echo "$lab/hosts/$1"; }
# (the data directory from the environment: `ctl exec ... -- CMD` keeps CMD's arguments its own)
ctl() { FLEETADM_DATA_DIR="$lab/controller" "$bin/controller" "$@"; }

# Run CMD inside host H: its network namespace, plus fresh mount+UTS namespaces with the host's
# private files bound over the shared ones.
on() {
  local h=$1; shift
  local d; d=$(host_dir "$h")
  ip netns exec "flab-$h" unshare --mount --uts --propagation private sh -c '
    d=$1; h=$2; shift 2
    hostname "$h"
    mount --bind "$d/hosts" /etc/hosts
    mount --bind "$d/machine-id" /etc/machine-id
    mount --bind "$d/etc-kubernetes" /etc/kubernetes
    mount --bind "$d/var-lib-kubelet" /var/lib/kubelet
    mount --bind "$d/var-lib-etcd" /var/lib/etcd
    mount --bind "$d/usr-local-bin" /usr/local/bin
    mount --bind "$d/etc-systemd-system" /etc/systemd/system
    mount --bind "$d/etc-modules-load.d" /etc/modules-load.d
    mount --bind "$d/etc-sysctl.d" /etc/sysctl.d
    mount --bind "$d/fstab" /etc/fstab
    export PATH="$d/../../bin:/usr/local/bin:$PATH"
    exec "$@"' sh "$d" "$h" "$@"
}

wait_for() { # SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "lab: timed out after ${t}s waiting for $what" >&2; return 1
}

up() {
  for b in controller node-agent kubeadm-sim; do
    [ -x "$bin/$b" ] || { echo "lab: $bin/$b missing; run: cargo build --workspace" >&2; exit 1; }
  done
  down >/dev/null 2>&1 || true
  mkdir -p "$lab/bin" "$lab/hosts" /etc/kubernetes /var/lib/kubelet /var/lib/etcd /usr/local/bin \
    /etc/systemd/system /etc/modules-load.d /etc/sysctl.d
  [ -e /etc/machine-id ] || touch /etc/machine-id
  [ -e /etc/fstab ] || touch /etc/fstab
  # Without a bundle the hosts come with kubeadm preinstalled; with LAB_BUNDLE=1 it comes from the
  # bundle the controller distributes (installed into each host's own /usr/local/bin).
  # (kubectl too: the simulator answers to that name; a real kubectl on this machine must not be
  # the one that talks to the stand-in apiservers)
  if [ "${LAB_BUNDLE:-0}" != 1 ]; then
    ln -sf "$bin/kubeadm-sim" "$lab/bin/kubeadm"
    ln -sf "$bin/kubeadm-sim" "$lab/bin/kubectl"
    ln -sf "$bin/kubeadm-sim" "$lab/bin/etcdctl"
    ln -sf "$bin/kubeadm-sim" "$lab/bin/etcdutl"
  fi
  # The lab hosts share one systemd, which knows no per-host kubelet.service: a `systemctl` first
  # on the hosts' PATH answers for the kubelet (the simulator's stand-in, restarted from the
  # kubeadm the host has now) and hands everything else to the real one.
  cat > "$lab/bin/systemctl" <<'SH'
#!/bin/sh
case "$1:$2" in
  restart:kubelet|restart:kubelet.service) exec kubeadm __restart-kubelet ;;
  is-active:kubelet|is-active:kubelet.service) exec kubeadm __kubelet-active ;;
esac
for s in /usr/bin/systemctl /bin/systemctl; do [ -x "$s" ] && exec "$s" "$@"; done
echo "systemctl: not found" >&2; exit 127
SH
  chmod 0755 "$lab/bin/systemctl"
  modprobe bridge 2>/dev/null || true; modprobe veth 2>/dev/null || true
  ip link add $br type bridge
  [ -n "$bastion" ] || ip addr add $net.1/24 dev $br
  ip link set $br up
  [ -z "$bastion" ] || up_bastion
  for i in $(seq 1 "$n"); do
    local h=h$i d; d=$(host_dir h$i)
    mkdir -p "$d"/{etc-kubernetes,var-lib-kubelet,var-lib-etcd,state,usr-local-bin,etc-systemd-system,etc-modules-load.d,etc-sysctl.d}
    printf '# lab host %s\n' "$h" > "$d/fstab"
    printf '127.0.0.1\tlocalhost\n%s.%s\t%s\n' $net $((10 + i)) "$h" > "$d/hosts"
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$d/machine-id"; echo >> "$d/machine-id"
    ip netns add "flab-$h"
    ip link add "flab-$h" type veth peer name eth0 netns "flab-$h"
    ip link set "flab-$h" master $br up
    ip -n "flab-$h" addr add $net.$((10 + i))/24 dev eth0
    ip -n "flab-$h" link set eth0 up
    ip -n "flab-$h" link set lo up
    ip -n "flab-$h" route add default via $net.$([ -n "$bastion" ] && echo 254 || echo 1)
  done
  start_controller
  [ "$bastion" != relay ] || register_and_start_relay
  # Labels at enrollment, when this agent build has them (the version-skew test runs older ones).
  local labels=""; "$bin/node-agent" enroll --help 2>/dev/null | grep -q -- '--labels' && labels=1
  local tok; tok=$(ctl token create --uses "$n" --ttl 1h --description lab -o json)
  local token hash
  token=$(sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' <<<"$tok")
  hash=$(sed -n 's/.*"ca_hash": *"\([^"]*\)".*/\1/p' <<<"$tok")
  for i in $(seq 1 "$n"); do
    local h=h$i d; d=$(host_dir h$i)
    on "$h" "$bin/node-agent" enroll --controller $agent_addr --token "$token" --ca-hash "$hash" \
      --state-dir "$d/state" --node-name "$h" --no-start ${labels:+--labels "lab=yes,index=$i"} ${proxy:+--proxy $proxy} \
      >"$d/enroll.log" 2>&1 \
      || { cat "$d/enroll.log" >&2; exit 1; }
    start_agent "$h"
  done
  wait_for 60 "$n connected agents" sh -c "[ \$('$bin/controller' nodes list -o json --data-dir '$lab/controller' | grep -c '\"connected\": true') -eq $n ]"
  echo "lab: controller on $ctl_addr${bastion:+ (agents dial $agent_addr through the $bastion)}, $n hosts enrolled and connected (h1..h$n = $net.11..$net.$((10 + n)))"
}

# The bastion: one leg on the hosts' bridge, one towards the controller, no forwarding between
# them; tinyproxy on the hosts' side allows CONNECT to the controller's port only, or the relay
# (started once the controller runs) forwards its port to the controller's.
up_bastion() {
  ip netns add flab-bastion
  ip link add flab-bst type veth peer name lan0 netns flab-bastion
  ip link set flab-bst master $br up
  ip -n flab-bastion addr add $net.254/24 dev lan0
  ip -n flab-bastion link set lan0 up
  ip -n flab-bastion link set lo up
  ip link add flab-up type veth peer name up0 netns flab-bastion
  ip addr add 10.79.0.1/24 dev flab-up
  ip link set flab-up up
  ip -n flab-bastion addr add 10.79.0.2/24 dev up0
  ip -n flab-bastion link set up0 up
  ip netns exec flab-bastion sysctl -qw net.ipv4.ip_forward=0
  printf '%s\n' "User nobody" "Group nogroup" "Port 3128" "Listen $net.254" "Timeout 600" \
    "Allow $net.0/24" "ConnectPort 9443" "MaxClients 200" "LogLevel Connect" > "$lab/tinyproxy.conf"
  [ "$bastion" != proxy ] || start_proxy
}

# The operator's steps: make the relay's key on the bastion, register it with the controller,
# start the relay.
register_and_start_relay() {
  local pub
  pub=$(ip netns exec flab-bastion "$bin/controller" relay --print-public-key --key-file "$lab/relay.key" --name bastion 2>/dev/null)
  ctl relays add bastion --public-key "$pub" >/dev/null
  start_relay
}

start_relay() {
  ip netns exec flab-bastion "$bin/controller" relay --listen $agent_addr --upstream $ctl_addr --name bastion \
    --key-file "$lab/relay.key" --metrics-listen $relay_metrics >>"$lab/relay.log" 2>&1 &
  echo $! > "$lab/relay.pid"
  wait_for 10 "the relay on $agent_addr" ip netns exec flab-bastion sh -c "ss -ltn | grep -q '$agent_addr'"
}

stop_relay() {
  [ -f "$lab/relay.pid" ] && kill -9 "$(cat "$lab/relay.pid")" 2>/dev/null || true
  pkill -9 -f "relay --listen $agent_addr --upstream $ctl_addr" 2>/dev/null || true
  for _ in $(seq 50); do pgrep -f "relay --listen $agent_addr --upstream $ctl_addr" >/dev/null || break; sleep 0.1; done
}

start_proxy() {
  ip netns exec flab-bastion tinyproxy -d -c "$lab/tinyproxy.conf" >>"$lab/tinyproxy.log" 2>&1 &
  echo $! > "$lab/tinyproxy.pid"
  wait_for 10 "tinyproxy on $net.254:3128" ip netns exec flab-bastion sh -c "ss -ltn | grep -q '$net.254:3128'"
}

stop_proxy() {
  [ -f "$lab/tinyproxy.pid" ] && kill "$(cat "$lab/tinyproxy.pid")" 2>/dev/null || true
  pkill -f "tinyproxy -d -c $lab/tinyproxy.conf" 2>/dev/null || true
  for _ in $(seq 50); do pgrep -f "tinyproxy -d -c $lab/tinyproxy.conf" >/dev/null || break; sleep 0.1; done
}

start_controller() {
  rm -f "$lab/controller/admin.sock"
  # (the backup schedule is checked every minute; the lab checks more often)
  FLEETADM_BACKUP_ROUND_SECS=${LAB_BACKUP_ROUND:-60} \
  "$bin/controller" serve --data-dir "$lab/controller" --listen $ctl_addr --advertise-address "${ctl_addr%:*}" \
    ${bastion:+--advertise-address "${agent_addr%:*}"} ${LAB_METRICS:+--metrics-listen $LAB_METRICS} \
    >>"$lab/controller.log" 2>&1 &
  echo $! > "$lab/controller.pid"
  wait_for 30 "controller admin socket" test -S "$lab/controller/admin.sock"
}

start_agent() {
  local h=$1 d; d=$(host_dir "$1")
  on "$h" env ${proxy:+HTTPS_PROXY=$proxy} "$bin/node-agent" run --state-dir "$d/state" --backoff-initial 200ms --backoff-max 2s \
    ${LAB_INVENTORY_INTERVAL:+--inventory-interval $LAB_INVENTORY_INTERVAL} ${LAB_PEERS:+--peer-listen 0.0.0.0:7451} \
    >>"$d/agent.log" 2>&1 &
  echo $! > "$d/agent.pid"
}

stop_agent() {
  local d; d=$(host_dir "$1")
  [ -f "$d/agent.pid" ] && kill -9 "$(cat "$d/agent.pid")" 2>/dev/null || true
  # the agent runs as a child of unshare/ip; make sure nothing of it survives
  pkill -9 -f "node-agent run --state-dir $d/state" 2>/dev/null || true
}

down() {
  if [ -f "$lab/controller.pid" ]; then
    local pid; pid=$(cat "$lab/controller.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  pkill -9 -f "serve --data-dir $lab/controller" 2>/dev/null || true
  stop_proxy
  stop_relay
  for d in "$lab"/hosts/*; do
    [ -d "$d" ] || continue
    pkill -9 -f "node-agent run --state-dir $d/state" 2>/dev/null || true
    # the stand-in kubelet first (it would start its pods again), then its pods
    for p in kubelet apiserver etcd kube-controller-manager kube-scheduler; do
      [ -f "$d/etc-kubernetes/sim/$p.pid" ] && kill -9 "$(cat "$d/etc-kubernetes/sim/$p.pid")" 2>/dev/null || true
    done
  done
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^flab-'); do
    ip link del "$l" 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '/^flab-/{print $1}'); do ip netns del "$ns"; done
  ip link del $br 2>/dev/null || true
  rm -rf "$lab"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up ;;
  down) down ;;
  ctl) ctl "$@" ;;
  on) on "$@" ;;
  start-agent) start_agent "$1" ;;
  kill-controller) kill -9 "$(cat "$lab/controller.pid")"; while kill -0 "$(cat "$lab/controller.pid")" 2>/dev/null; do sleep 0.1; done ;;
  start-controller) start_controller ;;
  stop-agent) stop_agent "$1" ;;
  restart-proxy) stop_proxy; start_proxy ;;
  restart-relay) stop_relay; start_relay ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
