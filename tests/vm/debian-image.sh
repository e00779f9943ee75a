#!/usr/bin/env bash
# Build (once, cached) a minimal Debian root with systemd for package tests, as a raw ext4 image:
# tests/.cache/vm/debian.img. The guest kernel's modules are inside; a driver unit runs commands
# the host drops into a 9p share (tag "lab") as cmd.N files and writes out.N / rc.N back.
set -euo pipefail
exec 3>&1 1>&2
here=$(cd "$(dirname "$0")" && pwd)
cache=$("$here/prepare.sh")
img=$cache/debian.img
if [ -f "$img" ] && [ "$img" -nt "$0" ]; then echo "$img" >&3; exit 0; fi
for p in debootstrap e2fsprogs; do dpkg -s $p >/dev/null 2>&1 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $p >/dev/null; }; done
ver=$(cat "$cache/kernel/.done")
root=$cache/debian-root
rm -rf "$root"
debootstrap --variant=minbase --include=systemd-sysv,iproute2,kmod,udev,ca-certificates,procps bookworm "$root" >/dev/null
mkdir -p "$root/lib/modules"
cp -a "$cache/kernel/lib/modules/$ver" "$root/lib/modules/"
depmod -b "$root" "$ver"
echo fleetadm-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 fleetadm-vm\n' > "$root/etc/hosts"
: > "$root/etc/machine-id"   # a fresh id on first boot
printf 'virtio_net\n9pnet_virtio\n9p\n' > "$root/etc/modules-load.d/lab.conf"
ln -sf /dev/null "$root/etc/systemd/system/getty@tty1.service"
cat > "$root/usr/local/sbin/lab-net" <<'SH'
#!/bin/sh
# Static address from the kernel command line: fleetadm.ip=10.77.0.11/24
ip=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^fleetadm\.ip=//p')
dev=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
ip link set lo up
[ -n "$ip" ] && [ -n "$dev" ] && ip addr add "$ip" dev "$dev" && ip link set "$dev" up
exit 0
SH
cat > "$root/usr/local/sbin/lab-driver" <<'SH'
#!/bin/bash
# Run the host's commands from the 9p share, one at a time, in order; survives reboots.
mkdir -p /lab
mountpoint -q /lab || mount -t 9p -o trans=virtio,version=9p2000.L lab /lab || exit 1
echo "$(cat /proc/sys/kernel/random/boot_id)" > /lab/booted.tmp && mv /lab/booted.tmp /lab/booted
while true; do
  for f in $(ls /lab | grep -E '^cmd\.[0-9]+$' | sort -t. -k2 -n); do
    n=${f#cmd.}
    [ -e /lab/rc.$n ] && continue
    bash /lab/$f > /lab/out.$n 2>&1
    echo $? > /lab/rc.$n.tmp && mv /lab/rc.$n.tmp /lab/rc.$n
  done
  sleep 0.3
done
SH
chmod +x "$root/usr/local/sbin/lab-net" "$root/usr/local/sbin/lab-driver"
cat > "$root/etc/systemd/system/lab-net.service" <<'UNIT'
[Unit]
Description=lab static network
DefaultDependencies=no
After=systemd-udev-settle.service systemd-modules-load.service
Before=network-online.target network.target
Wants=network.target
[Service]
Type=oneshot
ExecStartPre=/bin/sh -c 'for i in $(seq 50); do ls /sys/class/net | grep -qv "^lo$" && exit 0; sleep 0.1; done'
ExecStart=/usr/local/sbin/lab-net
RemainAfterExit=yes
[Install]
WantedBy=network-online.target multi-user.target
UNIT
cat > "$root/etc/systemd/system/lab-driver.service" <<'UNIT'
[Unit]
Description=lab command driver
After=lab-net.service systemd-modules-load.service
[Service]
ExecStart=/usr/local/sbin/lab-driver
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable lab-net.service lab-driver.service >/dev/null 2>&1
chroot "$root" apt-get clean
rm -f "$img.tmp"
mkfs.ext4 -q -L root -d "$root" "$img.tmp" 2G
mv "$img.tmp" "$img"
rm -rf "$root"
echo "$img" >&3
