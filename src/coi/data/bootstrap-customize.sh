#!/bin/sh
# Run by mmdebstrap (as a customize hook) on the new root filesystem "$1":
# makes a minimal Debian system boot as an Incus system container.
set -eu
root="$1"

# eth0 gets its address by DHCP from the Incus bridge (systemd-networkd),
# names resolve through systemd-resolved, which asks the bridge's resolver.
# coi's session containers have their address, default route and resolver set
# before init runs (the same address DHCP then leases): networkd keeps them
# rather than dropping them as foreign while it takes over the link.
mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/networkd.conf.d"
cat > "$root/etc/systemd/network/10-eth0.network" <<'NET'
[Match]
Name=eth0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
KeepConfiguration=static
NET
printf '[Network]\nManageForeignRoutes=no\n' > "$root/etc/systemd/networkd.conf.d/coi.conf"
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
ln -sf /run/systemd/resolve/resolv.conf "$root/etc/resolv.conf"

# Units that have nothing to do in a container and slow its start.
for unit in systemd-networkd-wait-online.service getty@tty1.service \
            systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
  chroot "$root" systemctl mask "$unit" >/dev/null 2>&1 || true
done
# systemd empties /tmp during boot, which may come after coi has started
# using the container: keep /tmp instead (it lives on the container's disk).
mkdir -p "$root/etc/tmpfiles.d"
echo 'd /tmp 1777 root root -' > "$root/etc/tmpfiles.d/tmp.conf"
# Debian 13 mounts a tmpfs on /tmp at boot, which would hide what coi put there.
chroot "$root" systemctl mask tmp.mount >/dev/null 2>&1 || true
rm -f "$root/etc/hostname"
