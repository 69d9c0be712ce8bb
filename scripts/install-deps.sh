#!/usr/bin/env bash
# Install the Debian packages vmhive needs; idempotent, quiet when all is there.
set -euo pipefail
PACKAGES=(
  qemu-system-x86 qemu-utils ovmf seabios
  busybox-static cpio kmod dosfstools mtools syslinux syslinux-common
  e2fsprogs fdisk systemd-boot-efi xz-utils zstd xorriso isolinux
  debootstrap dnsmasq-base nftables iproute2 iputils-ping openssh-client
)
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
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
