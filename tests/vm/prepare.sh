#!/usr/bin/env bash
# Prepare the VM test harness: Debian's kernel (with IPVS) and a small busybox initramfs that
# mounts the host's root filesystem read-only over 9p (with a tmpfs overlay on top), so a guest
# runs the very binaries built on the host against a real Debian kernel.
#
# Idempotent: everything lands in tests/.cache/vm and is reused.
set -euo pipefail
exec 3>&1 1>&2
here=$(cd "$(dirname "$0")" && pwd)
cache=${FLEETADM_VM_CACHE:-$here/../.cache/vm}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

pkgs=(qemu-system-x86 qemu-utils busybox-static kmod ipvsadm cpio iproute2)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -f "$cache/kernel/.done" ]; then
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || { echo "cannot find Debian's kernel package" >&2; exit 1; }
  rm -rf "$cache/kernel" "$cache/deb" && mkdir -p "$cache/deb"
  (cd "$cache/deb" && apt-get download "$kpkg" 2>/dev/null)
  dpkg -x "$cache"/deb/*.deb "$cache/kernel"
  ver=$(ls "$cache/kernel/lib/modules")
  depmod -b "$cache/kernel" "$ver"
  echo "$ver" > "$cache/kernel/.done"
  rm -rf "$cache/deb"
fi
ver=$(cat "$cache/kernel/.done")
kroot="$cache/kernel"

if [ ! -f "$cache/initramfs.cpio.gz" ] || [ "$here/init" -nt "$cache/initramfs.cpio.gz" ] || [ "$0" -nt "$cache/initramfs.cpio.gz" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work"/{bin,dev,proc,sys,mods,lower,upper,newroot}
  cp /bin/busybox "$work/bin/busybox"
  : > "$work/modules.order"
  for m in virtio_pci 9pnet_virtio 9p overlay virtio_blk ext4; do
    modprobe -d "$kroot" -S "$ver" --show-depends "$m" | awk '$1=="insmod"{print $2}' | while read -r ko; do
      base=$(basename "$ko")
      if [ ! -f "$work/mods/$base" ]; then
        cp "$ko" "$work/mods/$base"
        echo "$base" >> "$work/modules.order"
      fi
    done
  done
  cp "$here/init" "$work/init"
  chmod +x "$work/init"
  (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1 > "$cache/initramfs.cpio.gz.tmp")
  mv "$cache/initramfs.cpio.gz.tmp" "$cache/initramfs.cpio.gz"
fi
ls "$kroot"/boot/vmlinuz-* >/dev/null
echo "$cache" >&3
