#!/usr/bin/env bash
# Build the version-skew test's binaries before `cargo test` runs, sharing the dependencies
# already compiled in target/. (`cargo test` holds target/'s lock while tests run, so the test on
# its own must build in a separate target dir and compile every dependency again: minutes.)
#   out: target/skew/prebuilt/pinned/{controller,node-agent}   the tests/skew/baseline commit
#        target/skew/prebuilt/probe/{controller,node-agent}    this tree with the skew-probe feature
# tests/run.sh runs it and points the test at it with FLEETADM_SKEW_PREBUILT; this tree's own
# binaries in target/debug are put back afterwards (a relink: their artifacts are still fresh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
pin=$(grep -v '^[[:space:]]*#' tests/skew/baseline | grep -m1 -E '^[0-9a-f]{40}$') \
  || { echo "tests/skew/baseline names no commit" >&2; exit 1; }
git cat-file -e "$pin^{commit}" 2>/dev/null \
  || { echo "the pinned commit $pin is not in this clone (a shallow clone? git fetch --unshallow)" >&2; exit 1; }
out=$root/target/skew/prebuilt
wt=$root/target/skew/worktree
rm -rf "$out"
mkdir -p "$out/pinned" "$out/probe"
git worktree remove --force "$wt" >/dev/null 2>&1 || true
rm -rf "$wt"
git worktree prune
git worktree add --detach --force "$wt" "$pin" >/dev/null 2>&1
(cd "$wt" && CARGO_TARGET_DIR="$root/target" cargo build --locked -p controller -p node-agent --bins)
cp target/debug/controller target/debug/node-agent "$out/pinned/"
git worktree remove --force "$wt"
cargo build --locked -p controller -p node-agent --bins --features controller/skew-probe,node-agent/skew-probe
cp target/debug/controller target/debug/node-agent "$out/probe/"
cargo build --workspace --all-targets --locked
echo "$pin" > "$out/pinned/.pin"
git rev-parse HEAD > "$out/probe/.rev"
