#!/usr/bin/env bash
# Installs every Debian package the build, the demo and the tests need.
# Idempotent: packages already present are skipped, so a warm machine pays nothing.
set -euo pipefail

PACKAGES=(
  pkg-config libtpms-dev          # the TPM engine vtpmd links against
  swtpm swtpm-tools               # reference implementation for differential tests
  tpm2-tools                      # host and guest TPM clients
  openssl                         # vtpm-setup and libvirt tests: certificate chains checked with openssl verify
  qemu-system-x86                 # boots the test guests (TCG)
  qemu-utils                      # qemu-img: the qcow2 disk of libvirt-test.py's internal snapshots
  busybox-static cpio             # guest initramfs
  iproute2 procps                 # ss/pgrep used by test scripts
  debootstrap                     # sid roots: QEMU 11 (kernel-tests/prepare-qemu11.sh), swtpm 0.10 (bench/prepare-swtpm-sid.sh)
  strace                          # the bench counts device flushes per NV_Write
  make gcc-12 libelf1             # kernel-tests/virtio-tpm-driver: the guest module (libelf1: objtool)
  # kernel-tests/libvirt-test.py: the libvirt
  # daemon (libvirtd 9.0), its QEMU driver and virsh. Not
  # libvirt-daemon-system: that one enables and starts services (libvirtd,
  # virtlogd, the default network) and pulls polkit and firewall packages;
  # these three ship no services and run no maintainer scripts, and
  # --no-install-recommends keeps the system QEMU as it is.
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  man-db groff-base               # scripts/install-test.sh renders the man pages
)

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)   # kernel-tests/migration-test.py
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all Debian packages present"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# libvirtd runs QEMU as libvirt-qemu (group kvm), an account Debian's
# libvirt-daemon-system creates; without that package (see above) it is
# made here the same way (system user, group kvm, uid 64055 if free, also in
# group libvirt-qemu), so libvirt-test.py meets the user a real host has.
if ! getent passwd libvirt-qemu >/dev/null; then
  echo "install-deps: creating the system user libvirt-qemu (group kvm), as libvirt-daemon-system does"
  getent group kvm >/dev/null || $SUDO addgroup --quiet --system kvm
  uid=()
  getent passwd 64055 >/dev/null || uid=(--uid 64055)
  $SUDO adduser --quiet --system --ingroup kvm --disabled-login --disabled-password \
    --home /var/lib/libvirt --no-create-home --gecos "Libvirt Qemu" "${uid[@]}" libvirt-qemu
  if ! getent group libvirt-qemu >/dev/null; then
    gid=()
    getent group 64055 >/dev/null || gid=(--gid 64055)
    $SUDO addgroup --quiet --system "${gid[@]}" libvirt-qemu
  fi
  $SUDO adduser --quiet libvirt-qemu libvirt-qemu
fi
