#!/usr/bin/env bash
# Install the Debian packages vmhive needs; idempotent, quiet when all is there.
set -euo pipefail
PACKAGES=(
  qemu-system-x86 qemu-utils ovmf seabios
  busybox-static cpio kmod dosfstools mtools syslinux syslinux-common
  e2fsprogs fdisk systemd-boot-efi xz-utils zstd
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
