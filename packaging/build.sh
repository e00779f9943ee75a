#!/usr/bin/env bash
# Build .deb and .rpm packages of node-agent, the controller and the relay into dist/, from a clean checkout.
#   packaging/build.sh                 # version from Cargo.toml, package revision 1
#   DEB_REVISION=2 packaging/build.sh  # a newer build of the same version (upgrade tests)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${DEB_REVISION:-1}
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version '^3'
command -v cargo-generate-rpm >/dev/null || cargo install cargo-generate-rpm --locked
command -v dpkg-shlibdeps >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null; }

cargo build --release --locked -p node-agent -p controller
for bin in node-agent controller; do
  out=packaging/generated/$bin
  rm -rf "$out"
  "target/release/$bin" generate-docs "$out"
  gzip -9n "$out"/man/*.1
done
# The relay package (a variant of the controller's) carries the relay's own man page.
mkdir -p packaging/generated/relay
cp packaging/generated/controller/man/controller-relay.1.gz packaging/generated/relay/fleetadm-relay.1.gz
mkdir -p dist
for pkg in node-agent controller; do
  cargo deb -p "$pkg" --no-build --deb-revision "$rev" -o dist/ >/dev/null
  cargo generate-rpm -p "$pkg" -s "release = \"$rev\"" -o dist/ >/dev/null
done
cargo deb -p controller --variant relay --no-build --deb-revision "$rev" -o dist/ >/dev/null
cargo generate-rpm -p controller --variant relay -s "release = \"$rev\"" -o dist/ >/dev/null
ls -1 dist/
