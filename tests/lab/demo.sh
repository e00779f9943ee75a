#!/bin/bash
# The main job, on one machine: build fleetadm, start a lab fleet of 5 hosts (3 masters, 2
# workers; network/mount/UTS namespaces, a node-agent on each, enrolled with a bootstrap token),
# build and import an offline bundle, and let `controller cluster create` turn the fleet into an
# HA cluster with live progress. The Kubernetes binaries in the bundle are the test-only kubeadm
# simulator (tests/src/bin/kubeadm-sim.rs) and stand-ins; fleetadm drives them as the real ones.
#
# usage: sudo tests/lab/demo.sh          (Debian; installs what it needs)
# On a kernel with IPVS the lab runs here and stays up afterwards (tests/lab/lab.sh down removes
# it). On a kernel without IPVS (containers, some CI hosts) it runs inside a qemu VM with Debian's
# kernel (tests/vm/) and prints the VM's output.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export LAB_DIR=${LAB_DIR:-/tmp/fleetadm-lab} LAB_HOSTS=5 LAB_BUNDLE=1

run_lab() {
  say() { printf '\n$ %s\n' "$*"; }
  tests/lab/lab.sh up
  mkdir -p "$LAB_DIR/bundles"
  say "controller bundle build ... -o k8s-lab.tar.gz   (kubeadm simulator + dummy kubelet, units, an addon)"
  tests/lab/make-bundle.sh "$LAB_DIR/bundles/k8s-lab.tar.gz" >/dev/null
  say "controller bundle import k8s-lab.tar.gz"
  tests/lab/lab.sh ctl bundle import "$LAB_DIR/bundles/k8s-lab.tar.gz"
  say "controller nodes list"
  tests/lab/lab.sh ctl nodes list
  say "controller cluster create lab --masters h1,h2,h3 --nodes h4,h5 --bundle k8s-lab --dry-run"
  tests/lab/lab.sh ctl cluster create lab --masters h1,h2,h3 --nodes h4,h5 --bundle k8s-lab --dry-run
  say "controller cluster create lab --masters h1,h2,h3 --nodes h4,h5 --bundle k8s-lab"
  tests/lab/lab.sh ctl cluster create lab --masters h1,h2,h3 --nodes h4,h5 --bundle k8s-lab
  say "controller cluster status lab"
  tests/lab/lab.sh ctl cluster status lab
  echo
  echo "# master h2's /etc/hosts (apiserver.cluster.local -> itself):"
  cat "$LAB_DIR/hosts/h2/hosts"
  echo "# worker h4's /etc/hosts (apiserver.cluster.local -> the VIP):"
  cat "$LAB_DIR/hosts/h4/hosts"
  echo "# worker h4's apiserver load balancer (IPVS), programmed and guarded by its node-agent:"
  ip netns exec flab-h4 ipvsadm -Ln 2>/dev/null || ip netns exec flab-h4 "${FLEETADM_BIN_DIR:-target/debug}/node-agent" lb show
}

if [ "${1:-}" = "--here" ] || grep -q "fleetadm.script=" /proc/cmdline 2>/dev/null; then
  modprobe ip_vs 2>/dev/null || true
  run_lab
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "run as root (the lab creates network namespaces)" >&2; exit 1; }
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v ip >/dev/null || need+=(iproute2)
command -v ipvsadm >/dev/null || need+=(ipvsadm)
command -v unshare >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
cargo build --workspace --locked
if modprobe ip_vs 2>/dev/null && modprobe dummy 2>/dev/null; then
  run_lab
  echo
  echo "The lab is still running. Try: tests/lab/lab.sh ctl cluster status lab"
  echo "                               tests/lab/lab.sh ctl cluster logs lab --host h4"
  echo "Remove it with:                tests/lab/lab.sh down"
else
  echo "This kernel has no IPVS modules; running the lab inside a VM with Debian's kernel."
  out=$root/tests/.cache/runs/demo
  mkdir -p "$out"
  status=0
  tests/vm/run.sh tests/lab/demo.sh "$out" 900 || status=$?
  cat "$out/console.log"
  exit $status
fi
