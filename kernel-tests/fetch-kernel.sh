#!/usr/bin/env bash
# Fetches Debian's guest kernel (the package linux-image-amd64 points at)
# into build/kernel-tests/ without installing it: the host's /boot is not
# touched. Cached: does nothing when the kernel is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${KT_BUILD:-$here/../build/kernel-tests}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -s "$out/vmlinuz" ]; then
  echo "fetch-kernel: using cached $out/vmlinuz"
  exit 0
fi

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "fetch-kernel: cannot resolve linux-image-amd64 (run 'apt-get update' first)" >&2
  exit 1
fi
echo "fetch-kernel: downloading $pkg"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 777 "$tmp"   # apt's download user must be able to write here
(cd "$tmp" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
deb=$(ls "$tmp"/*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || { echo "fetch-kernel: apt-get download $pkg produced no package" >&2; exit 1; }
dpkg-deb -x "$deb" "$tmp/root"
config=$(ls "$tmp"/root/boot/config-* | head -n 1)
for opt in CONFIG_TCG_TPM CONFIG_TCG_TIS CONFIG_TCG_CRB CONFIG_DEVTMPFS CONFIG_SERIAL_8250; do
  grep -q "^$opt=y" "$config" || { echo "fetch-kernel: $pkg lacks built-in $opt" >&2; exit 1; }
done
cp "$tmp"/root/boot/vmlinuz-* "$out/vmlinuz.tmp"
cp "$config" "$out/kernel-config"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$pkg" > "$out/kernel-package"
echo "fetch-kernel: $out/vmlinuz from $pkg"
