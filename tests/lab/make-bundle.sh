#!/bin/bash
# Build a small offline bundle for the lab and the end-to-end test: the kubeadm simulator as
# bin/kubeadm-sim, bin/kubectl, bin/etcdctl and bin/etcdutl (one blob, deduplicated), bin/kubeadm
# running the simulator at the bundle's VERSION, a dummy kubelet and crictl, kubelet units,
# an addon manifest, and a post-bootstrap hook.
# usage: tests/lab/make-bundle.sh OUT.tar.gz [NAME] [VERSION] [ARCH]   (prints the bundle dir)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${FLEETADM_BIN_DIR:-$root/target/debug}
out=$1 name=${2:-k8s-lab} version=${3:-v1.29.9} arch=${4:-amd64}
dir=$(dirname "$out")/$name.d
rm -rf "$dir" && mkdir -p "$dir"/{bin,conf,manifests,scripts}
cp "$bin/kubeadm-sim" "$dir/bin/kubeadm-sim"
# kubeadm of this bundle's version (the stand-in kubelet it starts, and so each node's reported
# kubelet version, follow it)
printf '#!/bin/sh\nKUBEADM_SIM_VERSION=%s exec /usr/local/bin/kubeadm-sim "$@"\n' "$version" > "$dir/bin/kubeadm"
cp "$bin/kubeadm-sim" "$dir/bin/kubectl"
cp "$bin/kubeadm-sim" "$dir/bin/etcdctl"
cp "$bin/kubeadm-sim" "$dir/bin/etcdutl"
printf '#!/bin/sh\necho "kubelet (lab stand-in) $*"\n' > "$dir/bin/kubelet"
printf '#!/bin/sh\necho "crictl (lab stand-in) $*"\n' > "$dir/bin/crictl"
chmod 0755 "$dir"/bin/*
cat > "$dir/conf/kubelet.service" <<'UNIT'
[Unit]
Description=kubelet: The Kubernetes Node Agent
After=containerd.service
[Service]
ExecStart=/usr/local/bin/kubelet
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
cat > "$dir/conf/10-kubeadm.conf" <<'UNIT'
[Service]
Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf"
Environment="KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml"
ExecStart=
ExecStart=/usr/local/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS
UNIT
cat > "$dir/manifests/cni.yaml" <<'YAML'
apiVersion: v1
kind: Namespace
metadata:
  name: lab-cni
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: lab-cni
  namespace: lab-cni
spec: {}
YAML
printf '#!/bin/sh\necho "post-bootstrap hook for $FLEETADM_BUNDLE ($FLEETADM_KUBERNETES_VERSION)"\n' > "$dir/scripts/post-bootstrap.sh"
chmod 0755 "$dir/scripts/post-bootstrap.sh"
"$bin/controller" bundle build "$dir" -o "$out" --name "$name" --version "$version" --arch "$arch" >&2
echo "$dir"
