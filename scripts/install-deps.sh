#!/usr/bin/env bash
# Install the Debian packages vmhive needs; idempotent, quiet when all is there.
set -euo pipefail
PACKAGES=(
  qemu-system-x86 qemu-utils ovmf seabios
  busybox-static cpio kmod dosfstools mtools syslinux syslinux-common
  e2fsprogs fdisk systemd-boot-efi xz-utils zstd xorriso isolinux
  debootstrap dnsmasq-base nftables iproute2 iputils-ping openssh-client
  prometheus
  postgresql
)
# The web UI: its end-to-end tests drive Debian's chromium; its assets come from
# npm. node and npm may come from elsewhere (NodeSource's nodejs bundles npm and
# conflicts with Debian's npm), so Debian's are installed only when npm is absent.
PACKAGES+=(chromium)
command -v npm >/dev/null || PACKAGES+=(nodejs npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The tiny image build uses `apt-get download`, which needs package lists.
if [ ${#missing[@]} -eq 0 ] && ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
  exit 0
fi
$SUDO apt-get update -qq
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
# prometheus is here for promtool (tests check GET /metrics with it); its
# postinst would start a Prometheus server. A policy-rc.d that answers 101
# forbids starting any service during the install (an existing one is the
# admin's and stays), and on a systemd host the unit is disabled afterwards.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
if [ -d /run/systemd/system ] && [ -e /lib/systemd/system/prometheus.service ]; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
# postgresql is here for `vmhive serve --db postgresql://...` and its tests, which
# start throwaway servers of their own (tests/pg.py); the cluster Debian creates is
# not used, so it is disabled when this script installed it (never an admin's).
if [[ " ${missing[*]} " == *" postgresql "* ]] && [ -d /run/systemd/system ] \
  && [ -e /lib/systemd/system/postgresql.service ]; then
  $SUDO systemctl disable --now postgresql.service >/dev/null 2>&1 || true
fi
