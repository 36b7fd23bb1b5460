#!/usr/bin/env bash
# build-initramfs.sh: builds build/kernel-tests/initramfs.cpio.gz, the test
# guest's whole root file system:
#
#   /bin/busybox + applet symlinks   busybox-static
#   /bin/tpm2 + tpm2_* symlinks      tpm2-tools (multi-call binary)
#   /usr/lib/x86_64-linux-gnu/*      every library of tpm2 (ldd), all
#                                    libtss2-* (the TCTIs are dlopen'ed) and
#                                    their libraries, OpenSSL's modules
#   /lib64/ld-linux-x86-64.so.2      the dynamic loader
#   /etc/ssl/openssl.cnf             OpenSSL's configuration
#   /lib/modules/*.ko + /etc/vtpm-modules   TPM drivers, only if the kernel
#                                    has them as modules (see fetch-kernel.sh)
#   /lib/modules/virtio/*.ko + /etc/vtpm-virtio-modules   virtio_pci and
#                                    its dependencies if they are modules,
#                                    then virtio_tpm.ko (virtio-tpm-driver/,
#                                    if build.sh built it); loaded only by a
#                                    guest booted with vtpm.virtio_id=N
#   /init                            kernel-tests/guest-init
#   /scenario/tpm2-scenario.sh       kernel-tests/scenario/tpm2-scenario.sh
#
# Rebuilt only when an input changed (KT_REBUILD=1 forces it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

out="$KT_BUILD/initramfs.cpio.gz"
root="$KT_BUILD/initramfs"   # staging tree, kept: run-tests.sh reads it
scenario="$KT_HERE/scenario/tpm2-scenario.sh"
libdir=/usr/lib/x86_64-linux-gnu
loader=/lib64/ld-linux-x86-64.so.2

[ -f "$scenario" ] || die "build-initramfs: the scenario $scenario is missing"
vtpm_ko="$KT_BUILD/virtio-tpm/virtio_tpm.ko"   # kernel-tests/virtio-tpm-driver/build.sh
[ -f "$KT_BUILD/guest-modules" ] || die "build-initramfs: run fetch-kernel.sh first ($KT_BUILD/guest-modules missing)"
busybox=/bin/busybox
file -L "$busybox" | grep -q 'statically linked' || die "build-initramfs: $busybox is not static; install busybox-static"
tpm2=$(command -v tpm2) || die "build-initramfs: tpm2 not found; install tpm2-tools"
tpm2=$(readlink -f "$tpm2")

# Every executable or library we take from the host, before dependencies.
roots=("$tpm2" "$libdir"/libtss2-*.so.[0-9] "$libdir"/ossl-modules/*.so "$libdir"/engines-3/*.so)

# deps FILE...: the libraries FILE... load, recursively (ldd resolves the
# whole tree), one path per line.
deps() {
  local f
  for f in "$@"; do ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'; done | sort -u
}
mapfile -t libs < <(deps "${roots[@]}")

# Fingerprint of all inputs: skip the build when nothing changed.
fingerprint=$(
  {
    sha256sum "$KT_HERE/build-initramfs.sh" "$KT_HERE/lib.sh" "$KT_HERE/guest-init" "$scenario" "$KT_BUILD/guest-modules" "$KT_BUILD/vmlinuz"
    sha256sum "$KT_BUILD/guest-virtio-modules" "$vtpm_ko" 2>/dev/null || true
    stat -L -c '%n %s %Y' "$busybox" "$loader" "${roots[@]}" "${libs[@]}" /etc/ssl/openssl.cnf
  } | sha256sum | cut -d' ' -f1
)
if [ -z "${KT_REBUILD:-}" ] && [ -s "$out" ] && [ -f "$root/init" ] &&
   [ "$(cat "$out.inputs" 2>/dev/null)" = "$fingerprint" ]; then
  echo "build-initramfs: $out is up to date"
  exit 0
fi

rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc/ssl,scenario,lib64,lib/modules,usr/lib/ssl,"$libdir"}
ln -s bin "$root/sbin"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"

# busybox and its applets.
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# tpm2 and the tpm2_* commands: the host's tpm2_* symlinks to tpm2.
cp "$tpm2" "$root/bin/tpm2"
for cmd in /usr/bin/tpm2_*; do
  if [ "$(readlink -f "$cmd")" = "$tpm2" ]; then ln -s tpm2 "$root/bin/${cmd##*/}"; fi
done
[ -e "$root/bin/tpm2_getrandom" ] || die "build-initramfs: no tpm2_* commands found next to $tpm2"

# Libraries, by the name the loader looks for (the symlink's name when the
# host has one, e.g. libc.so.6, with the real file's contents).
for lib in "${libs[@]}" "$libdir"/libtss2-*.so.[0-9]; do
  cp -L "$lib" "$root$libdir/${lib##*/}"
done
cp -r -L "$libdir/ossl-modules" "$libdir/engines-3" "$root$libdir/"
cp -L "$loader" "$root$loader"
cp -L /etc/ssl/openssl.cnf "$root/etc/ssl/openssl.cnf"
ln -s /etc/ssl/openssl.cnf "$root/usr/lib/ssl/openssl.cnf"

# TPM driver modules, if the kernel has them as modules (load order kept).
: > "$root/etc/vtpm-modules"
if [ -s "$KT_BUILD/guest-modules" ]; then
  moddir=$(echo "$KT_BUILD"/kernel/lib/modules/*)
  while read -r ko; do
    name=${ko##*/}
    case "$name" in
      *.ko) cp "$moddir/$ko" "$root/lib/modules/$name" ;;
      *.ko.xz) xz -dc "$moddir/$ko" > "$root/lib/modules/${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$moddir/$ko" > "$root/lib/modules/${name%.zst}" ;;
      *.ko.gz) gzip -dc "$moddir/$ko" > "$root/lib/modules/${name%.gz}" ;;
      *) die "build-initramfs: unexpected module file $ko" ;;
    esac
    name=${name%.ko*}.ko
    echo "/lib/modules/$name" >> "$root/etc/vtpm-modules"
  done < "$KT_BUILD/guest-modules"
fi

# virtio_pci and friends, then the virtio-tpm driver (if it was built).
: > "$root/etc/vtpm-virtio-modules"
if [ -f "$vtpm_ko" ]; then
  mkdir -p "$root/lib/modules/virtio"
  moddir=$(echo "$KT_BUILD"/kernel/lib/modules/*)
  while read -r ko; do
    name=${ko##*/}
    case "$name" in
      *.ko) cp "$moddir/$ko" "$root/lib/modules/virtio/$name" ;;
      *.ko.xz) xz -dc "$moddir/$ko" > "$root/lib/modules/virtio/${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$moddir/$ko" > "$root/lib/modules/virtio/${name%.zst}" ;;
      *) die "build-initramfs: unexpected module file $ko" ;;
    esac
    echo "/lib/modules/virtio/${name%.ko*}.ko" >> "$root/etc/vtpm-virtio-modules"
  done < "$KT_BUILD/guest-virtio-modules"
  cp "$vtpm_ko" "$root/lib/modules/virtio/virtio_tpm.ko"
fi

cp "$KT_HERE/guest-init" "$root/init"
chmod 755 "$root/init"
cp "$scenario" "$root/scenario/tpm2-scenario.sh"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
echo "$fingerprint" > "$out.inputs"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1), $(find "$root" -type f | wc -l) files)"
