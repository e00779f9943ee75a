#!/bin/bash
# Benchmark: deliver a bundle with one SIZE_MIB file to 1, 10 and 50 agents (real node-agents in
# lab namespaces, real mTLS, real disk) and print the time until every agent holds it, the bytes
# the controller sent on the wire (TX on the lab bridge, TLS and HTTP/2 included), bytes per host,
# and the controller's peak RSS. Stops each run after the distribute phase.
# usage: tests/lab/bundle-bench.sh [SIZE_MIB (1024)] [AGENT COUNTS (1 10 50)]
# env:   BENCH_PEERS ("0 1"): each count from the controller only (0) and with the agents
#        serving each other (1: --peer-listen), side by side.
#        BENCH_CONTROLLER_MAX (no limit): controller-only runs only up to this many agents (50
#        hosts from the controller alone at 40 Mbit/s take ~12 minutes).
#        BENCH_RATE (e.g. 1gbit; unset: no limit): every host's link and the controller's are
#        shaped to this rate each way (tc tbf), as on a network where each machine has its own
#        NIC; without it, everything shares this machine's loopback-speed bridge and CPUs.
# Needs root and SIZE x (largest count + 3) of free disk under LAB_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-1024}; shift || true
counts=${*:-1 10 50}
export LAB_DIR=${LAB_DIR:-/tmp/fleetadm-bench} LAB_BUNDLE=1
work=$(mktemp -d /tmp/fleetadm-bench-bundle.XXXX)
trap 'rm -rf "$work"; "$here/lab.sh" down >/dev/null 2>&1 || true' EXIT
"$here/make-bundle.sh" "$work/base.tar.gz" >/dev/null 2>&1
rm -f "$work/base.tar.gz"
mkdir -p "$work/k8s-lab.d/images"
head -c $((size * 1024 * 1024)) /dev/urandom > "$work/k8s-lab.d/images/payload.tar"
bin=${FLEETADM_BIN_DIR:-$here/../../target/debug}
"$bin/controller" bundle build "$work/k8s-lab.d" -o "$work/bench.tar.gz" --name bench --version v1.29.9 --arch amd64 >/dev/null
echo "BENCH bundle: $(du -m "$work/bench.tar.gz" | cut -f1) MiB packed, payload ${size} MiB"
shape() { # shape N: every link of the lab at BENCH_RATE
  [ -n "${BENCH_RATE:-}" ] || return 0
  local q=(root tbf rate "$BENCH_RATE" burst 1mb latency 100ms)
  tc qdisc replace dev flab0 "${q[@]}"
  for i in $(seq 1 "$1"); do
    tc qdisc replace dev "flab-h$i" "${q[@]}"
    ip netns exec "flab-h$i" tc qdisc replace dev eth0 "${q[@]}"
  done
}
results=()
for n in $counts; do
for peers in ${BENCH_PEERS:-0 1}; do
  if [ "$peers" = 0 ] && [ -n "${BENCH_CONTROLLER_MAX:-}" ] && [ "$n" -gt "$BENCH_CONTROLLER_MAX" ]; then
    continue
  fi
  if [ "$peers" = 1 ]; then export LAB_PEERS=1; else unset LAB_PEERS; fi
  LAB_HOSTS=$n "$here/lab.sh" up >/dev/null
  shape "$n"
  LAB_HOSTS=$n "$here/lab.sh" ctl bundle import "$work/k8s-lab.d" >/dev/null
  nodes=$(seq -s, 2 "$n" | sed 's/\([0-9]\+\)/h\1/g')
  tx0=$(cat /sys/class/net/flab0/statistics/tx_bytes)
  cpu0=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
  t0=$(date +%s%N)
  args=(cluster create bench --masters h1 --bundle bench --detach)
  [ -n "$nodes" ] && args+=(--nodes "$nodes")
  LAB_HOSTS=$n "$here/lab.sh" ctl "${args[@]}" >/dev/null
  while :; do
    st=$(LAB_HOSTS=$n "$here/lab.sh" ctl cluster status bench -o json)
    grep -q '"type": "distribute"' <<<"$st" && break
    grep -q '"state": "failed"' <<<"$st" && { echo "rollout failed: $(grep '"message"' <<<"$st")" >&2; exit 1; }
    sleep 0.2
  done
  t1=$(date +%s%N)
  tx1=$(cat /sys/class/net/flab0/statistics/tx_bytes)
  cpu1=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
  # the machine's CPUs busy during the run (all agents and the controller share them)
  busy=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN{split(a,x," "); split(b,y," "); t=y[2]-x[2]; if (t<1) t=1; printf "%.0f", 100*(y[1]-x[1])/t}')
  pid=$(cat "$LAB_DIR/controller.pid")
  rss=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}')
  sent=$((tx1 - tx0))
  # (each agent logs this once per blob it was sent to a peer for)
  redirects=$(cat "$LAB_DIR"/hosts/*/agent.log 2>/dev/null | grep -c 'fetching from a peer' || true)
  echo "BENCH agents=$n peers=$peers rate=${BENCH_RATE:-none} size_mib=$size time_s=$secs controller_tx_mib=$((sent / 1048576)) per_host_mib=$((sent / n / 1048576)) blobs_from_peers=$redirects cpu_busy_pct=$busy controller_peak_rss_mib=$((rss / 1024))"
  [ "$n" = 1 ] && [ "$peers" = 1 ] && one=$secs
  results+=("$n $peers $secs $((sent / 1048576))")
  LAB_HOSTS=$n "$here/lab.sh" down >/dev/null
done
done
# Side by side: each run against one host's time (with peers) and the controller's egress.
echo "BENCH summary (payload ${size} MiB, rate ${BENCH_RATE:-none})"
printf 'BENCH %7s  %-15s  %9s  %10s  %14s\n' agents mode time_s vs_one_host controller_tx_mib
for r in "${results[@]}"; do
  read -r n peers secs mib <<<"$r"
  ratio=$(awk -v s="$secs" -v o="${one:-}" 'BEGIN{if (o == "" || o == 0) print "-"; else printf "%.1fx", s/o}')
  printf 'BENCH %7s  %-15s  %9s  %10s  %14s\n' "$n" "$([ "$peers" = 1 ] && echo peers || echo controller-only)" "$secs" "$ratio" "$mib"
done

