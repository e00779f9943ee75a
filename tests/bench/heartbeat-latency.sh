#!/bin/bash
# Heartbeat round-trip latency with AGENTS agents connected while a rollout runs and a GIB bundle
# is fetched by FETCHERS of them: this tree's controller and the controller of BEFORE (the last
# commit before the actor/non-blocking rework), side by side, with the same bench client
# (tests/src/bin/hb-bench.rs). Release builds; prints numbers, asserts nothing.
# usage: tests/bench/heartbeat-latency.sh [AGENTS] [FETCHERS] [GIB] [BEFORE]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
agents=${1:-1000} fetchers=${2:-10} gib=${3:-1} before=${4:-24aabef}
cd "$root"
cargo build --release --locked -q -p controller -p fleetadm-tests --bin controller --bin hb-bench
wt=$root/target/bench-before/src
if [ ! -x "$root/target/bench-before/controller" ]; then
  git worktree remove --force "$wt" 2>/dev/null || true
  git worktree add --detach --force "$wt" "$before" >/dev/null
  (cd "$wt" && CARGO_TARGET_DIR=$root/target/bench-before/target cargo build --release --locked -q -p controller)
  cp "$root/target/bench-before/target/release/controller" "$root/target/bench-before/controller"
  git worktree remove --force "$wt"
fi
ulimit -n 65536 2>/dev/null || true
echo "== before: controller of $(git rev-parse --short "$before")"
target/release/hb-bench "$root/target/bench-before/controller" "$agents" "$fetchers" "$gib"
echo "== after: controller of $(git rev-parse --short HEAD)"
target/release/hb-bench "$root/target/release/controller" "$agents" "$fetchers" "$gib"
