#!/usr/bin/env bash
# Package test on a real Debian with systemd (runs on the host):
#   build the .deb/.rpm packages (revision 1 and a newer revision 2), boot a debootstrapped Debian
#   under qemu on a private network inside a network namespace, `apt-get install ./node-agent*.deb`
#   there, enroll against a controller on the host side, and check: service enabled but idle
#   before enrollment, active and connected after, survives a reboot, upgrades itself from a
#   bundle (`controller agent upgrade`) without re-enrolling, stops on remove, state gone on purge. The relay package (fleetadm-relay) is
#   installed there too: idle until configured, runs as its own user, and the agent enrolls and
#   runs through it (the controller records the agent's address as the relay vouched for it).
#   Also inspects the .rpm files with rpm(8).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
fails=0
passes=0
ok() { echo "ok - $*"; passes=$((passes+1)); }
not_ok() { echo "not ok - $*"; fails=$((fails+1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
die() { echo "not ok - $*"; echo "package-vm: ${passes:-0} passed, $((fails+1)) failed"; exit 1; }

cache=$("$here/prepare.sh") || die "VM harness"
img=$("$here/debian-image.sh") || die "Debian image"
ver=$(cat "$cache/kernel/.done")
work=$(mktemp -d "$repo/tests/.cache/pkgtest.XXXX")
lab=$work/lab
mkdir -p "$lab"

# --- packages: a first build and a newer build of the same code
DEB_REVISION=1 packaging/build.sh > "$work/build1.log" 2>&1 || die "packaging/build.sh (see $work/build1.log)"
cp dist/node-agent_*-1_amd64.deb dist/fleetadm-relay_*-1_amd64.deb "$lab/" && cp dist/node-agent-*-1.x86_64.rpm dist/fleetadm-relay-*-1.x86_64.rpm "$work/"
DEB_REVISION=2 packaging/build.sh > "$work/build2.log" 2>&1 || die "packaging/build.sh revision 2"
cp dist/node-agent_*-2_amd64.deb dist/fleetadm-relay_*-2_amd64.deb "$lab/"
rdeb1=$(basename "$lab"/fleetadm-relay_*-1_amd64.deb)
rdeb2=$(basename "$lab"/fleetadm-relay_*-2_amd64.deb)
deb1=$(basename "$lab"/node-agent_*-1_amd64.deb)
deb2=$(basename "$lab"/node-agent_*-2_amd64.deb)

# --- the .rpm, inspected with Debian's rpm
command -v rpm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null
rpmf=$(ls "$work"/node-agent-*.rpm)
check "rpm ships the binary 0755" grep -q '^/usr/bin/node-agent .* 0100755 ' <(rpm -qp --dump "$rpmf" 2>/dev/null)
check "rpm ships the unit" grep -qx /usr/lib/systemd/system/node-agent.service <(rpm -qpl "$rpmf" 2>/dev/null)
check "rpm marks config.toml as config" grep -qx /etc/node-agent/config.toml <(rpm -qpc "$rpmf" 2>/dev/null)
check "rpm ships man pages and completions" test "$(rpm -qpl "$rpmf" 2>/dev/null | grep -c -e man1/node-agent -e completions)" -ge 3
check "rpm scriptlets enable/start and stop the unit" bash -c "rpm -qp --scripts '$rpmf' 2>/dev/null | grep -q 'systemctl enable node-agent.service' && rpm -qp --scripts '$rpmf' 2>/dev/null | grep -q 'disable --now node-agent.service'"
rrpm=$(ls "$work"/fleetadm-relay-*.rpm)
check "relay rpm ships the binary and its unit" bash -c "rpm -qpl '$rrpm' 2>/dev/null | grep -qx /usr/bin/fleetadm-relay && rpm -qpl '$rrpm' 2>/dev/null | grep -qx /usr/lib/systemd/system/fleetadm-relay.service"
check "relay rpm does not ship /usr/bin/controller" bash -c "! rpm -qpl '$rrpm' 2>/dev/null | grep -q /usr/bin/controller"
check "relay rpm scriptlets make its user and enable the unit" bash -c "rpm -qp --scripts '$rrpm' 2>/dev/null | grep -q 'useradd --system' && rpm -qp --scripts '$rrpm' 2>/dev/null | grep -q 'systemctl enable fleetadm-relay.service'"

# --- private network: bridge + tap in a namespace; controller on the host side of it
ns=fleetadm-pkg-$$
cleanup() {
  [ -n "${qpid:-}" ] && kill "$qpid" 2>/dev/null
  [ -n "${cpid:-}" ] && kill "$cpid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 10.77.0.1/24 dev br0
ip -n "$ns" link set br0 up
ip -n "$ns" tuntap add tap0 mode tap
ip -n "$ns" link set tap0 master br0 up
ctl=$work/ctl
ip netns exec "$ns" target/release/controller serve --data-dir "$ctl" --listen 10.77.0.1:9443 \
  --advertise-address 10.77.0.1 --heartbeat-interval 2s --config /dev/null > "$work/controller.log" 2>&1 &
cpid=$!
admin() { target/release/controller "$@" --data-dir "$ctl"; }
for _ in $(seq 100); do [ -S "$ctl/admin.sock" ] && break; sleep 0.1; done

qemu-img create -q -f qcow2 -b "$img" -F raw "$work/disk.qcow2"
boot() {
  ip netns exec "$ns" qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 1024 \
    -kernel "$cache/kernel/boot/vmlinuz-$ver" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 fleetadm.root=/dev/vda fleetadm.ip=10.77.0.11/24 panic=-1" \
    -drive file="$work/disk.qcow2",if=virtio,format=qcow2 \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:77:00:11 \
    -virtfs local,path="$lab",mount_tag=lab,security_model=none,multidevs=remap \
    -nographic -serial file:"$work/serial.log" -monitor none -display none > /dev/null 2>&1 &
  qpid=$!
}
booted_id() { cat "$lab/booted" 2>/dev/null; }
wait_boot() { # wait_boot PREVIOUS_BOOT_ID
  for _ in $(seq 900); do
    local b; b=$(booted_id)
    [ -n "$b" ] && [ "$b" != "$1" ] && return 0
    sleep 0.2
  done
  return 1
}
gx() { # run a command in the guest; prints its output; returns its exit code
  # (the counter lives in a file: gx often runs in a $(...) subshell)
  local n=$(( $(cat "$work/gx.n" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$work/gx.n"
  printf '%s\n' "$1" > "$lab/cmd.$n.tmp" && mv "$lab/cmd.$n.tmp" "$lab/cmd.$n"
  for _ in $(seq ${2:-600}); do [ -f "$lab/rc.$n" ] && break; sleep 0.2; done
  cat "$lab/out.$n" 2>/dev/null
  [ -f "$lab/rc.$n" ] || { echo "(guest command $n timed out)"; return 124; }
  return "$(cat "$lab/rc.$n")"
}
node_json() { admin nodes list -o json 2>/dev/null | python3 -c 'import json,sys; n=[x for x in json.load(sys.stdin) if x["name"]=="fleetadm-vm"]; print(json.dumps(n[0]) if n else "")'; }
connected() { node_json | grep -q '"connected": true'; }
wait_until() { local t=$1; shift; for _ in $(seq $((t*5))); do "$@" && return 0; sleep 0.2; done; return 1; }

boot
wait_boot "" || { tail -n 30 "$work/serial.log"; die "guest did not boot"; }
ok "Debian guest booted with systemd"

out=$(gx "cd /lab && DEBIAN_FRONTEND=noninteractive apt-get install -y ./$deb1 2>&1")
check "apt-get install ./$deb1" test $? -eq 0 || echo "$out"
check "unit enabled on install" gx "systemctl is-enabled node-agent"
check "service idle until enrolled (condition not met)" gx "! systemctl is-active -q node-agent && systemctl show -p ConditionResult node-agent | grep -q no"
check "state dir is 0700" gx "test \$(stat -c %a /var/lib/node-agent) = 700"
check "config is a conffile" gx "grep -qx /etc/node-agent/config.toml /var/lib/dpkg/info/node-agent.conffiles"
check "man page and completions installed" gx "test -f /usr/share/man/man1/node-agent.1.gz && test -f /usr/share/bash-completion/completions/node-agent"
check "--version carries the git revision" gx "node-agent --version | grep -q '$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)'"

# --- the relay package: installed, registered with the controller, configured; the agent then
# reaches the controller through it (agent -> 127.0.0.1:7443 -> relay -> 10.77.0.1:9443).
out=$(gx "cd /lab && DEBIAN_FRONTEND=noninteractive apt-get install -y ./$rdeb1 2>&1")
check "apt-get install ./$rdeb1" test $? -eq 0 || echo "$out"
check "relay install prints the command that registers its key" grep -q "controller relays add fleetadm-vm --public-key ed25519:" <<<"$out"
check "relay unit enabled, idle until /etc/fleetadm/relay.env exists" gx "systemctl is-enabled -q fleetadm-relay && ! systemctl is-active -q fleetadm-relay && systemctl show -p ConditionResult fleetadm-relay | grep -q no"
check "relay key is 0600 and owned by the relay's own user" gx "test \"\$(stat -c '%a %U' /var/lib/fleetadm-relay/relay.key)\" = '600 fleetadm-relay' && test \$(stat -c %a /var/lib/fleetadm-relay) = 700"
relay_pub=$(gx "fleetadm-relay --print-public-key 2>/dev/null")
out=$(admin relays add fleetadm-vm --public-key "$relay_pub" 2>&1)
check "relay registered with the controller" test $? -eq 0 || echo "$out"
out=$(gx "printf 'FLEETADM_RELAY_LISTEN=127.0.0.1:7443\nFLEETADM_RELAY_UPSTREAM=10.77.0.1:9443\n' > /etc/fleetadm/relay.env && systemctl restart fleetadm-relay && systemctl is-active fleetadm-relay" 2>&1)
check "relay active once configured" test $? -eq 0 || echo "$out"
check "relay runs as fleetadm-relay, not root" gx "test \"\$(ps -o user= -p \$(systemctl show -p MainPID --value fleetadm-relay))\" = fleetadm-relay"
check "relay logs to journald under its own name" wait_until 30 gx "journalctl -t fleetadm-relay --no-pager -o cat | grep -q 'relay forwarding'"
relay_key=$(gx "sha256sum /var/lib/fleetadm-relay/relay.key")

tok=$(admin token create -o json --description pkgtest)
token=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$tok")
hash=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_hash"])' <<<"$tok")
out=$(gx "node-agent enroll --controller 127.0.0.1:7443 --token $token --ca-hash $hash")
check "enroll through the relay succeeds and starts the service" grep -q "started node-agent.service" <<<"$out" || echo "$out"
check "service active after enrollment" gx "systemctl is-active -q node-agent"
check "controller lists the node as connected" wait_until 60 connected
# Directly, the controller would see 10.77.0.11; through the relay, the agent's own side of its
# connection to the relay, which only the relay's signed header can tell it.
via_relay() { node_json | grep -q '"peer_address": "127.0.0.1:'; }
check "the session runs through the relay, which vouched for the agent's address" via_relay
check "agent logs to journald" gx "journalctl -u node-agent --no-pager -o cat | grep -q 'session established'"
jv="journalctl -u node-agent --no-pager -o verbose"
check "journal entries name the program, the node and the session as fields" \
  gx "$jv | grep -q 'SYSLOG_IDENTIFIER=node-agent' && $jv | grep -q 'NODE=fleetadm-vm' && $jv | grep -Eq '^ +SESSION=[0-9]+$'"
# A task (preflight; it fails here: the guest has no kubeadm) logs with its id as a field, and a
# failure at warning priority.
out=$(admin cluster create pkg --masters fleetadm-vm --detach 2>&1)
check "a cluster create reaches the guest's agent" grep -q "recorded" <<<"$out" || echo "$out"
check "task entries carry TASK= as a field" wait_until 60 gx "$jv | grep -q 'TASK=pkg/preflight/fleetadm-vm/preflight'"
check "a failed task is logged at warning priority" gx "$jv -p warning | grep -q 'TASK=pkg/preflight/fleetadm-vm/preflight'"
serial=$(node_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cert_serial"])')
ident=$(gx "sha256sum /var/lib/node-agent/identity/node.key /var/lib/node-agent/identity/agent.json")

prev=$(booted_id)
gx "systemctl reboot" 10 >/dev/null
wait_boot "$prev" || die "guest did not come back from reboot"
ok "guest rebooted"
check "service active after reboot" wait_until 60 gx "systemctl is-active -q node-agent"
check "node connected again after reboot" wait_until 90 connected
relay_back() { via_relay && gx "systemctl is-active -q fleetadm-relay" >/dev/null; }
check "relay active after reboot, and the session runs through it again" wait_until 60 relay_back

# --- the agent upgrades itself: `controller agent upgrade` with the newer package in a bundle
# (fetched through the relay like any bundle blob, installed from a transient unit, the agent
# restarted by the package's scripts; the new agent reports the outcome).
ver1=${deb1#node-agent_}; ver1=${ver1%_amd64.deb}
ver2=${deb2#node-agent_}; ver2=${ver2%_amd64.deb}
mkdir -p "$work/agents.d/packages" && cp "$lab/$deb2" "$work/agents.d/packages/"
out=$(target/release/controller bundle build "$work/agents.d" -o "$work/agents.tar.gz" --name agents --version v1.29.9 2>&1 && admin bundle import "$work/agents.tar.gz" 2>&1)
check "a bundle carrying node-agent $ver2 imported" test $? -eq 0 || echo "$out"
pid_before=$(gx "systemctl show -p MainPID --value node-agent")
out=$(admin agent upgrade --bundle agents --nodes fleetadm-vm --dry-run 2>&1)
check "agent upgrade --dry-run names the version and the host" grep -q "node-agent $ver2 from bundle agents on 1 hosts" <<<"$out" || echo "$out"
check "the dry run changed nothing" gx "dpkg-query -W -f '\${Version}' node-agent | grep -qx -- '$ver1' && test \$(systemctl show -p MainPID --value node-agent) = '$pid_before'"
out=$(admin agent upgrade --bundle agents --nodes fleetadm-vm --timeout 5m 2>&1)
check "controller agent upgrade $ver1 -> $ver2 succeeds" test $? -eq 0 || echo "$out"
check "the restarted agent reported the upgrade" grep -q "fleetadm-vm | node-agent upgraded from $ver1 to $ver2" <<<"$out" || echo "$out"
check "upgraded version installed" gx "dpkg-query -W -f '\${Version}' node-agent | grep -qx -- '$ver2'"
check "service restarted by the upgrade" gx "systemctl is-active -q node-agent && test \$(systemctl show -p MainPID --value node-agent) != '$pid_before'"
check "the install ran in its own transient unit to success, the marker gone" gx "journalctl --no-pager -o cat -u 'node-agent-upgrade-*' | grep -q '^node-agent-upgrade-[0-9]*.service: Deactivated successfully' && test ! -e /var/lib/node-agent/agent-upgrade.json"
check "identity kept across upgrade" test "$ident" = "$(gx "sha256sum /var/lib/node-agent/identity/node.key /var/lib/node-agent/identity/agent.json")"
check "node connected after upgrade without re-enrolling" wait_until 60 bash -c "$(declare -f admin node_json connected); ctl='$ctl'; connected && node_json | grep -q '$serial'"
pid_after=$(gx "systemctl show -p MainPID --value node-agent")
out=$(admin agent upgrade --bundle agents --nodes fleetadm-vm 2>&1)
check "a second agent upgrade changes nothing" grep -q "fleetadm-vm | node-agent $ver2 is installed and running; nothing to do" <<<"$out" || echo "$out"
check "... and does not restart the agent" gx "test \$(systemctl show -p MainPID --value node-agent) = '$pid_after'"

out=$(gx "cd /lab && DEBIAN_FRONTEND=noninteractive apt-get install -y ./$rdeb2 2>&1")
relay_upgraded() {
  [ "$relay_key" = "$(gx "sha256sum /var/lib/fleetadm-relay/relay.key")" ] &&
    gx "systemctl is-active -q fleetadm-relay && dpkg-query -W -f '\${Version}' fleetadm-relay | grep -q -- '-2\$'" >/dev/null
}
check "relay upgrade to $rdeb2 keeps its key and the service" relay_upgraded || echo "$out"
connected_via_relay() { connected && via_relay; }
check "node reconnects through the upgraded relay" wait_until 60 connected_via_relay

check "remove stops the service and keeps state" gx "DEBIAN_FRONTEND=noninteractive apt-get remove -y node-agent >/dev/null 2>&1; ! systemctl is-active -q node-agent && test -f /var/lib/node-agent/identity/agent.json"
check "controller sees the node disconnect" wait_until 60 bash -c "$(declare -f admin node_json); ctl='$ctl'; node_json | grep -q '\"connected\": false'"
check "purge deletes the state" gx "DEBIAN_FRONTEND=noninteractive apt-get purge -y node-agent >/dev/null 2>&1; test ! -e /var/lib/node-agent"
check "relay purge stops it and deletes its key, config and user" gx "DEBIAN_FRONTEND=noninteractive apt-get purge -y fleetadm-relay >/dev/null 2>&1; ! systemctl is-active -q fleetadm-relay && test ! -e /var/lib/fleetadm-relay && test ! -e /etc/fleetadm/relay.env && ! getent passwd fleetadm-relay"
gx "systemctl poweroff" 10 >/dev/null
wait "$qpid" 2>/dev/null; qpid=
echo "package-vm: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
