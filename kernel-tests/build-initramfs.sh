#!/usr/bin/env bash
# Builds the test guest's initramfs: busybox-static, tpm2-tools with every
# library it links or dlopens (the device TCTI), the scenario and /init.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${KT_BUILD:-$here/../build/kernel-tests}
mkdir -p "$out"
out=$(cd "$out" && pwd)
root="$out/initramfs"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,scenario,lib64,usr/lib/x86_64-linux-gnu}

cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

tpm2=$(command -v tpm2) || { echo "build-initramfs: tpm2-tools is not installed" >&2; exit 1; }
cp "$tpm2" "$root/bin/tpm2"
for tool in getrandom pcrread pcrextend createprimary create load sign verifysignature nvdefine nvwrite \
            nvread evictcontrol readpublic quote checkquote startauthsession sessionconfig flushcontext \
            getcap loadexternal hash; do
  ln -sf tpm2 "$root/bin/tpm2_$tool"
done

libdir=/usr/lib/x86_64-linux-gnu
# Libraries loaded at run time rather than linked: the device TCTI.
extra=$(ls "$libdir"/libtss2-tcti-device.so.0)
copy_lib() {
  local src=$1 real
  real=$(readlink -f "$src")
  cp "$real" "$root$libdir/$(basename "$src")"
}
for dep in $( (ldd "$tpm2"; for e in $extra; do ldd "$e"; echo "x => $e (0)"; done) | awk '/=> \// {print $3}' | sort -u); do
  copy_lib "$dep"
done
cp "$(readlink -f /lib64/ld-linux-x86-64.so.2)" "$root/lib64/ld-linux-x86-64.so.2"
ln -s usr/lib "$root/lib"

cp "$here/guest-init" "$root/init"
chmod +x "$root/init"
cp "$here/scenario/tpm2-scenario.sh" "$root/scenario/tpm2-scenario.sh"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "build-initramfs: $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
