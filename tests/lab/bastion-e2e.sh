#!/bin/bash
# End-to-end behind a bastion, with workers (they need IPVS: run inside the VM with
# tests/vm/run.sh tests/lab/bastion-e2e.sh OUT, or on a Debian host as root). For each of the two
# ways through a bastion (Debian's tinyproxy doing HTTP CONNECT; `controller relay`), a 3-host
# lab whose hosts reach only the bastion (IP forwarding off) enrolls, imports a bundle, and
# `cluster create` makes 1 master and 2 workers, one worker at a time; the proxy or relay is
# restarted while the workers join, and the rollout completes. Prints TAP-ish lines and
# "bastion-e2e: N passed, M failed"; exit code = failures.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fails=0; passes=0
ok() { echo "ok - $*"; passes=$((passes+1)); }
not_ok() { echo "not ok - $*"; fails=$((fails+1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else not_ok "$what"; fi; }
t0=$(date +%s)
mode=""
finish() {
  [ -z "$mode" ] || LAB_BASTION=$mode "$here/lab.sh" down >/dev/null 2>&1
  echo "bastion-e2e: $passes passed, $fails failed ($(( $(date +%s) - t0 ))s)"
  exit "$fails"
}
trap finish EXIT
modprobe ip_vs 2>/dev/null || true

# The relay's connections open now (its /metrics, from the controller's side).
relay_open() {
  curl -s --max-time 5 "http://10.79.0.2:9101/metrics" | awk '/^fleetadm_relay_connections[{ ]/{s+=$2} END{print s+0}'
}
# Distinct hosts that opened a connection through tinyproxy after line $1 of its log.
proxy_clients_since() {
  tail -n +$(($1 + 1)) "$LAB_DIR/tinyproxy.log" 2>/dev/null | sed -n 's/.*: Connect (file descriptor [0-9]*): \([0-9.]*\)$/\1/p' | sort -u | wc -l
}
# Nodes the controller has a session with now.
connected_nodes() {
  "$here/lab.sh" ctl nodes list -o json 2>/dev/null | grep -c '"connected": true'
}

for mode in proxy relay; do
  export LAB_BASTION=$mode LAB_BUNDLE=1 LAB_HOSTS=3 LAB_DIR=/tmp/fleetadm-bastion-$mode
  lab() { "$here/lab.sh" "$@"; }
  ctl() { "$here/lab.sh" ctl "$@"; }
  echo "# --- through the $mode"
  lab up > "/tmp/bastion-$mode-up.log" 2>&1 || { cat "/tmp/bastion-$mode-up.log"; not_ok "$mode: lab comes up"; continue; }
  ok "$mode: 3 hosts enrolled and connected through the bastion"
  direct=$(ip netns exec flab-h2 timeout 3 bash -c 'exec 3<>/dev/tcp/10.79.0.1/9443' 2>&1 && echo reached || echo unreachable)
  check "$mode: a host has no direct path to the controller" test "$direct" = unreachable
  "$here/make-bundle.sh" "$LAB_DIR/k8s-lab.tar.gz" k8s-lab v1.29.9 amd64 >/dev/null 2>&1
  ctl bundle import "$LAB_DIR/k8s-lab.tar.gz" >/dev/null 2>&1
  ctl cluster create bx --masters h1 --nodes h2,h3 --bundle k8s-lab --max-parallel 1 --detach >/dev/null 2>&1
  ph=""
  for _ in $(seq 900); do
    p=$(ctl cluster status bx -o json 2>/dev/null | sed -n 's/^  "phase": "\(.*\)",$/\1/p')
    [ "$p" = join-workers ] && { ph=$p; break; }
    sleep 0.2
  done
  check "$mode: the rollout reached the worker joins" test "$ph" = join-workers
  logged=$(wc -l < "$LAB_DIR/tinyproxy.log" 2>/dev/null || echo 0)
  lab restart-$mode >/dev/null 2>&1
  echo "# restarted the $mode during the worker joins"
  ctl cluster status bx --watch > "$LAB_DIR/watch.out" 2>&1; rc=$?
  tail -n 2 "$LAB_DIR/watch.out" | sed 's/^/#   /'
  st=$(ctl cluster status bx -o json 2>&1)
  check "$mode: the rollout completes through the restarted $mode (1 master, 2 workers)" test $rc -eq 0 -a -n "$(grep '"message": "cluster bx is ready: 1 masters, 2 workers' <<<"$st")"
  # All three agents come back through the new process (the only way out of their network): the
  # rollout may end before the last of them notices the old one is gone, so wait (up to 30 s)
  # rather than count once. Proxy: three distinct hosts in its log since the restart; relay:
  # three connections open through it; and the controller has all three sessions.
  through=0; up=0
  for _ in $(seq 150); do
    if [ "$mode" = proxy ]; then through=$(proxy_clients_since "$logged"); else through=$(relay_open); fi
    up=$(connected_nodes)
    [ "${through:-0}" -ge 3 ] && [ "${up:-0}" -eq 3 ] && break
    sleep 0.2
  done
  check "$mode: all 3 agents reconnected through the new $mode ($through through it, $up sessions)" test "${through:-0}" -ge 3 -a "${up:-0}" -eq 3
  for w in h2 h3; do
    check "$mode: $w balances the apiserver over IPVS to the master" test -n "$(ip netns exec flab-$w ipvsadm -Ln | grep -- '-> 10.78.0.11:6443')"
    logs=$(ctl cluster logs bx --host $w 2>&1)
    check "$mode: $w fetched the bundle through the bastion and joined" test -n "$(grep 'blobs fetched' <<<"$logs")" -a -e "$LAB_DIR/hosts/$w/etc-kubernetes/kubelet.conf"
  done
  nodes=$(lab on h1 kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes 2>&1)
  check "$mode: the master sees both workers registered" test "$(grep -cE '^h[23] +Ready' <<<"$nodes")" -eq 2
  lab down >/dev/null 2>&1
done
mode=""
