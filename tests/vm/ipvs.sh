#!/bin/bash
# Runs inside the VM (tests/vm/run.sh): proves node-agent's IPVS load balancer on a real kernel.
# Three "masters" live in network namespaces behind a bridge; the root namespace is the worker.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEETADM_BIN_DIR:-$root/target/debug}
agent=$bin/node-agent
lab=$bin/lab-healthz
work=$(mktemp -d /tmp/ipvs.XXXX)
vip=10.103.97.2:6443
fails=0
passes=0
ok() { echo "ok - $*"; passes=$((passes+1)); }
not_ok() { echo "not ok - $*"; fails=$((fails+1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
now_ms() { date +%s%3N; }

# --- lab network: bridge in the root namespace, one namespace per real server
# (the kernel cannot autoload modules from inside this chroot, so load them here)
modprobe bridge; modprobe veth
ip link add labbr type bridge && ip addr add 10.200.0.1/24 dev labbr && ip link set labbr up
for i in 1 2 3; do
  ip netns add rs$i
  ip link add veth$i type veth peer name eth0 netns rs$i
  ip link set veth$i master labbr up
  ip -n rs$i addr add 10.200.0.1$i/24 dev eth0
  ip -n rs$i link set eth0 up
  ip -n rs$i link set lo up
  ip -n rs$i route add default via 10.200.0.1
done
"$lab" mkcert "$work/pki" 10.103.97.2 10.200.0.11 10.200.0.12 10.200.0.13
declare -A pid
start_rs() { ip netns exec rs$1 "$lab" serve 10.200.0.1$1:6443 "$work/pki/10.200.0.1$1.crt" "$work/pki/10.200.0.1$1.key" rs$1 >/dev/null 2>&1 & pid[$1]=$!; }
stop_rs() { kill "${pid[$1]}" 2>/dev/null; wait "${pid[$1]}" 2>/dev/null; }
for i in 1 2 3; do start_rs $i; done
sleep 0.5

rs_args="--rs 10.200.0.11:6443 --rs 10.200.0.12:6443 --rs 10.200.0.13:6443"
table() { ipvsadm -Ln | sed 1,3d; }

# --- the rtnetlink code's own test, on this kernel (the build host's kernel has no dummy links)
modprobe dummy 2>/dev/null
unit=$(ls -t "$root"/target/debug/deps/fleetadm_agent-* 2>/dev/null | grep -v '\.d$' | head -1)
check "rtnetlink unit test: dummy link, VIP address and source route in a fresh namespace" \
  "$unit" --exact lb::link::tests::dummy_vip_address_and_source_route_in_a_private_namespace --include-ignored -q

echo "# $(date +%T) lab ready"
# --- apply creates exactly the requested service
"$agent" lb apply --vip $vip $rs_args > "$work/apply1.txt" 2>&1
check "lb apply succeeds" test $? -eq 0
check "kernel has the virtual service with rr" grep -q "TCP  10.103.97.2:6443 rr" <(table)
check "kernel has exactly 3 masqueraded real servers with weight 1" test "$(table | grep -c -- '-> 10.200.0.1[123]:6443 *Masq *1 ')" -eq 3
check "exactly one virtual service" test "$(table | grep -c '^TCP')" -eq 1
check "VIP is on the dummy interface" ip -o addr show dev fleetadm-lb0 to 10.103.97.2/32
check "conntrack sysctl set" test "$(cat /proc/sys/net/ipv4/vs/conntrack)" = 1
check "expire_nodest_conn sysctl set" test "$(cat /proc/sys/net/ipv4/vs/expire_nodest_conn)" = 1
"$agent" lb show -o json --status-file "$work/none.json" > "$work/show.json"
check "lb show reports the same 3 real servers" test "$(grep -c '"addr": "10.200.0.1[123]:6443"' "$work/show.json")" -eq 3

# --- re-running changes nothing
before=$(table)
out=$("$agent" lb apply --vip $vip $rs_args 2>&1)
check "second apply is a no-op" grep -q "already up to date" <<<"$out"
check "kernel table unchanged" test "$before" = "$(table)"

# --- traffic through the VIP reaches every real server
seen=""
for n in 1 2 3 4 5 6; do seen="$seen $("$lab" get $vip "$work/pki/ca.crt" 2>/dev/null)"; done
for i in 1 2 3; do check "traffic via VIP reached rs$i" grep -qw rs$i <<<"$seen"; done

# --- changing the real-server list converges
"$agent" lb apply --vip $vip --rs 10.200.0.11:6443 --rs 10.200.0.13:6443 > "$work/apply2.txt" 2>&1
check "shrinking to 2 real servers" test "$(table | grep -c -- '->')" -eq 2
check "rs2 removed" bash -c "! ipvsadm -Ln | grep -q 10.200.0.12"
"$agent" lb apply --vip $vip $rs_args > /dev/null 2>&1
check "growing back to 3" test "$(table | grep -c -- '->')" -eq 3

# --- clean removes everything it made
"$agent" lb clean > "$work/clean.txt" 2>&1
check "lb clean removes the service" test "$(table | grep -c '^TCP')" -eq 0
check "lb clean removes the dummy interface" bash -c "! ip link show fleetadm-lb0 2>/dev/null"
out=$("$agent" lb clean 2>&1)
check "second clean has nothing to do" grep -q "nothing to clean" <<<"$out"

# --- guard: failover with real TLS health checks
status=$work/lb-status.json
start_guard() { "$agent" lb guard --vip $vip $rs_args --ca "$work/pki/ca.crt" --status-file "$status" >> "$work/guard.log" 2>&1 & gpid=$!; }
start_guard
wait_for() { # wait_for SECONDS CMD...
  local deadline=$(( $(now_ms) + $1 * 1000 )); shift
  while [ "$(now_ms)" -lt $deadline ]; do "$@" && return 0; sleep 0.05; done; return 1; }
weight_of() { table | awk -v a="10.200.0.1$1:6443" '$2==a {print $4}'; }
in_rotation() { [ "$(weight_of $1)" = 1 ]; }
out_of_rotation() { local w; w=$(weight_of $1); [ -z "$w" ] || [ "$w" = 0 ]; }
check "guard brings all 3 into rotation" wait_for 20 bash -c "[ \$(ipvsadm -Ln | grep -c 'Masq *1 ') -eq 3 ]"
stop_rs 2
check "stopped master leaves rotation" wait_for 10 out_of_rotation 2
check "guard reports rs2 unhealthy" wait_for 5 grep -q '"healthy": false' "$status"
check "other masters stay" bash -c "[ \$(ipvsadm -Ln | grep -c 'Masq *1 ') -eq 2 ]"
start_rs 2
check "restarted master comes back" wait_for 10 in_rotation 2

# --- never empty the VIP because every probe fails
stop_rs 1; stop_rs 2; stop_rs 3
sleep 4
check "all failing: last known set kept" test "$(table | grep -c -- '->')" -ge 1
check "all failing is reported" grep -q '"all_failing": true' "$status"
for i in 1 2 3; do start_rs $i; done
check "all back after recovery" wait_for 15 bash -c "[ \$(ipvsadm -Ln | grep -c 'Masq *1 ') -eq 3 ]"

# --- agent restart does not disturb live rules
before=$(table)
kill -TERM $gpid; wait $gpid 2>/dev/null
echo "# $(date +%T) agent stopped"
check "rules stay when the agent stops" test "$before" = "$(table)"
lines_before=$(grep -c "load balancer converged" "$work/guard.log")
start_guard
sleep 3
check "restarted agent adopts rules without changing them" test "$before" = "$(table)"
check "restarted agent made no kernel changes" test "$(grep -c "load balancer converged" "$work/guard.log")" -eq "$lines_before"

echo "# $(date +%T) checks done"
# --- benchmark: failover time (printed, not asserted)
measure() { # measure MODE i: sets $ms to the milliseconds until rs$i is out of rotation
  local t0
  t0=$(now_ms)
  if [ "$1" = refused ]; then stop_rs $2; else ip -n rs$2 link set eth0 down; fi
  if wait_for 30 out_of_rotation $2; then ms=$(( $(now_ms) - t0 )); else ms=99999; fi
  if [ "$1" = refused ]; then start_rs $2; else ip -n rs$2 link set eth0 up; fi
  wait_for 30 in_rotation $2 || echo "# rs$2 did not come back after $1"
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
for mode in refused blackholed; do
  samples=()
  for n in 1 2 3 4 5; do measure $mode 2; samples+=("$ms"); done
  med=$(printf '%s\n' "${samples[@]}" | median)
  echo "BENCH failover_${mode}_ms median=$med samples=${samples[*]} (interval 500ms, timeout 1s, fall 2)"
done
kill $gpid 2>/dev/null
for i in 1 2 3; do stop_rs $i; done
echo "# guard log tail"; tail -n 5 "$work/guard.log"
echo "ipvs-vm: $passes passed, $fails failed"
[ $fails -eq 0 ]
