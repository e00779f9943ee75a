#!/usr/bin/env bash
# Run SCRIPT inside a fresh VM (Debian kernel, host root over 9p) and exit with its exit code.
# usage: tests/vm/run.sh SCRIPT OUTDIR [TIMEOUT_SECS]
# The script's output is in OUTDIR/console.log; the kernel console in OUTDIR/serial.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script=$(realpath "$1")
out=$(mkdir -p "$2" && realpath "$2")
timeout_s=${3:-600}
cache=$("$here/prepare.sh")
ver=$(cat "$cache/kernel/.done")
rm -f "$out/exit" "$out/console.log"
timeout "$timeout_s" qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -smp 2 -m 1536 \
  -kernel "$cache/kernel/boot/vmlinuz-$ver" -initrd "$cache/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 fleetadm.script=$script fleetadm.out=$out fleetadm.modules=$cache/kernel/lib/modules" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$out",mount_tag=out,security_model=none,multidevs=remap \
  -nographic -no-reboot -serial file:"$out/serial.log" -monitor none -display none -nic none \
  >/dev/null 2>&1 || true
if [ ! -f "$out/exit" ]; then
  echo "VM did not finish (timeout ${timeout_s}s?); serial console:" >&2
  tail -n 40 "$out/serial.log" >&2 || true
  exit 125
fi
exit "$(cat "$out/exit")"
