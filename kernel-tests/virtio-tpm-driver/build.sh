#!/usr/bin/env bash
# build.sh: builds the guest module virtio_tpm.ko out of tree against the
# headers of the guest kernel the kernel tests boot (fetch-kernel.sh), into
# build/kernel-tests/virtio-tpm/virtio_tpm.ko. The headers come from
# Debian's registry like the kernel: linux-headers-<ver>,
# linux-headers-<ver-without-flavour>-common and linux-kbuild-<major.minor>,
# all of the guest kernel's exact package version, fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into
# build/kernel-tests/headers/ (never installed). Cached; rebuilt when the
# source changes. Needs make and the compiler the kernel was built with
# (gcc-12 for Debian 12's kernel; scripts/install-deps.sh installs it).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
src="$KT_HERE/virtio-tpm-driver"
out="$KT_BUILD/virtio-tpm"
hroot="$KT_BUILD/headers"

[ -f "$KT_BUILD/kernel/.fetched" ] || bash "$KT_HERE/fetch-kernel.sh"
vmlinuz=$(find "$KT_BUILD/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
kver=${vmlinuz##*/vmlinuz-}                       # 6.1.0-57-amd64
ipkg="linux-image-$kver"
# The package version of the unpacked image, e.g. 6.1.192-3.
ver=$(apt-cache show "$ipkg" 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -n 1)
[ -n "$ver" ] || die "virtio-tpm build: no version for $ipkg (apt-get update?)"
common="linux-headers-${kver%-*}-common"
kbuild="linux-kbuild-$(echo "$kver" | cut -d. -f1,2)"
hdir="$hroot/usr/src/linux-headers-$kver"

if [ ! -f "$hroot/.fetched" ] || [ "$(cat "$hroot/.fetched")" != "$kver $ver" ]; then
  rm -rf "$hroot"
  mkdir -p "$hroot/debs"
  chmod 755 "$hroot/debs"
  chown _apt "$hroot/debs" 2>/dev/null || chmod 777 "$hroot/debs"
  echo "virtio-tpm build: apt-get download linux-headers-$kver $common $kbuild ($ver)"
  if ! (cd "$hroot/debs" && apt-get download -q "linux-headers-$kver=$ver" "$common=$ver" "$kbuild=$ver" > apt.log 2>&1); then
    cat "$hroot/debs/apt.log" >&2
    die "virtio-tpm build: downloading the kernel headers failed"
  fi
  for deb in "$hroot"/debs/*.deb; do dpkg-deb -x "$deb" "$hroot"; done
  rm -rf "$hroot/debs"
  # The flavour's Makefile includes the common one by its installed path.
  sed -i "s|^include /usr/src/|include $hroot/usr/src/|" "$hdir/Makefile"
  echo "$kver $ver" > "$hroot/.fetched"
fi

mkdir -p "$out"
cp "$src/virtio_tpm.c" "$src/Kbuild" "$out/"
if [ -f "$out/virtio_tpm.ko" ] && [ "$out/virtio_tpm.ko" -nt "$src/virtio_tpm.c" ] && [ "$out/virtio_tpm.ko" -nt "$src/Kbuild" ]; then
  echo "virtio-tpm build: $out/virtio_tpm.ko is up to date"
  exit 0
fi
echo "virtio-tpm build: make -C $hdir M=$out modules"
make -s -C "$hdir" M="$out" modules
modinfo -F vermagic "$out/virtio_tpm.ko" 2>/dev/null | sed 's/^/virtio-tpm build: vermagic /' || true
echo "virtio-tpm build: $out/virtio_tpm.ko"
