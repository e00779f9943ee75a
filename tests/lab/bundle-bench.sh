#!/bin/bash
# Benchmark: deliver a bundle with one SIZE_MIB file to 1, 10 and 50 agents (real node-agents in
# lab namespaces, real mTLS, real disk) and print the time until every agent holds it, the bytes
# the controller sent on the wire (TX on the lab bridge, TLS and HTTP/2 included), bytes per host,
# and the controller's peak RSS. Stops each run after the distribute phase.
# usage: tests/lab/bundle-bench.sh [SIZE_MIB (1024)] [AGENT COUNTS (1 10 50)]
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
for n in $counts; do
  LAB_HOSTS=$n "$here/lab.sh" up >/dev/null
  LAB_HOSTS=$n "$here/lab.sh" ctl bundle import "$work/k8s-lab.d" >/dev/null
  nodes=$(seq -s, 2 "$n" | sed 's/\([0-9]\+\)/h\1/g')
  tx0=$(cat /sys/class/net/flab0/statistics/tx_bytes)
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
  pid=$(cat "$LAB_DIR/controller.pid")
  rss=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}')
  sent=$((tx1 - tx0))
  echo "BENCH agents=$n size_mib=$size time_s=$secs controller_tx_mib=$((sent / 1048576)) per_host_mib=$((sent / n / 1048576)) controller_peak_rss_mib=$((rss / 1024))"
  LAB_HOSTS=$n "$here/lab.sh" down >/dev/null
done
