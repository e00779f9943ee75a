#!/usr/bin/env bash
# Runs every fleetadm test: formatting, lints, unit tests, loopback integration tests (real TLS,
# real sled), and the VM tests (real Debian kernel under qemu) when their prerequisites can be
# installed. Installs what it needs itself, so it works on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step is stamped with the seconds since the start, so a slow step shows in the CI log.
log() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v git >/dev/null || need_apt+=(git)
command -v openssl >/dev/null || need_apt+=(openssl)
# the admin API test runs a Python grpcio client in a virtualenv
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# The bastion lab test runs Debian's tinyproxy in a namespace (its own service is not wanted).
command -v tinyproxy >/dev/null || need_apt+=(tinyproxy)
command -v setpriv >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  if [[ " ${need_apt[*]} " == *" tinyproxy "* ]]; then
    systemctl disable --now tinyproxy >/dev/null 2>&1 || service tinyproxy stop >/dev/null 2>&1 || true
  fi
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy >/dev/null 2>&1 || true

log "format"
cargo fmt --all -- --check

log "build"
cargo build --workspace --all-targets --locked

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "VM harness (Debian kernel under qemu)"
tests/vm/prepare.sh >/dev/null

log "packages: build .deb/.rpm, install and run them on a real Debian with systemd"
tests/vm/package.sh

log "version-skew binaries (the pinned commit and a probe build, sharing target/'s dependencies)"
tests/skew/prebuild.sh >/dev/null 2>&1 || tests/skew/prebuild.sh
export FLEETADM_SKEW_PREBUILT=$PWD/target/skew/prebuilt

log "unit, property, integration and VM tests"
# Property tests of every untrusted-input parser (*/src/props.rs) run 2,000 cases each here
# (256 in a plain `cargo test`); a failing case proptest finds is saved under
# */proptest-regressions/ and replayed first on every later run.
PROPTEST_CASES=${PROPTEST_CASES:-2000} cargo test --workspace --locked --no-fail-fast
log "all tests passed"
