#!/usr/bin/env bash
# Installs every Debian package the build, the demo and the tests need.
# Idempotent: packages already present are skipped, so a warm machine pays nothing.
set -euo pipefail

PACKAGES=(
  pkg-config libtpms-dev          # the TPM engine vtpmd links against
  swtpm swtpm-tools               # reference implementation for differential tests
  tpm2-tools                      # host and guest TPM clients
  qemu-system-x86                 # boots the test guests (TCG)
  busybox-static cpio             # guest initramfs
  iproute2 procps                 # ss/pgrep used by test scripts
  debootstrap                     # sid roots: QEMU 11 (kernel-tests/prepare-qemu11.sh), swtpm 0.10 (bench/prepare-swtpm-sid.sh)
  strace                          # the bench counts device flushes per NV_Write
  make gcc-12 libelf1             # kernel-tests/virtio-tpm-driver: the guest module (libelf1: objtool)
)

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)   # kernel-tests/migration-test.py
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all Debian packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
