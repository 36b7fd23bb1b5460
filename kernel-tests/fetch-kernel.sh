#!/usr/bin/env bash
# fetch-kernel.sh: gets Debian's guest kernel for the kernel tests without
# installing it. The concrete package that linux-image-amd64 depends on is
# downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into
# build/kernel-tests/kernel/; the host's /boot and dpkg database are never
# touched. Leaves:
#
#   build/kernel-tests/vmlinuz         copy of kernel/boot/vmlinuz-*
#   build/kernel-tests/kernel-config   copy of kernel/boot/config-*
#   build/kernel-tests/guest-modules   TPM drivers that are modules, in load
#                                      order, as paths under kernel/lib/modules/<ver>/
#                                      (empty when tpm_crb and tpm_tis are built in)
#   build/kernel-tests/guest-virtio-modules  the same for virtio_pci and what
#                                      it needs (the vhost-user guests load
#                                      them before virtio-tpm-driver's module)
#
# Cached: does nothing when a complete earlier download is present. Remove
# build/kernel-tests/kernel/ (or set KT_REFETCH=1) to fetch again.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kdir="$KT_BUILD/kernel"
stamp="$kdir/.fetched"
if [ -z "${KT_REFETCH:-}" ] && [ -f "$stamp" ] && [ -s "$KT_BUILD/vmlinuz" ] && [ -f "$KT_BUILD/guest-modules" ] && [ -f "$KT_BUILD/guest-virtio-modules" ]; then
  echo "fetch-kernel: cached $(cat "$stamp") in $kdir"
  exit 0
fi

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
  | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}')
if [ -z "$pkg" ]; then
  die "fetch-kernel: cannot resolve the package linux-image-amd64 depends on; run 'apt-get update' first"
fi

mkdir -p "$KT_BUILD"
dl=$(mktemp -d "$KT_BUILD/download.XXXXXX")
trap 'rm -rf "$dl"' EXIT
chmod 755 "$dl"
# apt drops privileges to _apt for the download; let it write here.
chown _apt "$dl" 2>/dev/null || chmod 777 "$dl"
echo "fetch-kernel: apt-get download $pkg"
if ! (cd "$dl" && apt-get download -q "$pkg" >"$dl/apt.log" 2>&1); then
  cat "$dl/apt.log" >&2
  die "fetch-kernel: apt-get download $pkg failed"
fi
deb=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n 1)
[ -n "$deb" ] || die "fetch-kernel: apt-get download $pkg left no .deb in $dl"

echo "fetch-kernel: unpacking $(basename "$deb") into $kdir"
rm -rf "$kdir"
mkdir -p "$kdir"
dpkg-deb -x "$deb" "$kdir"

vmlinuz=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
config=$(find "$kdir/boot" -maxdepth 1 -name 'config-*' | head -n 1)
if [ -z "$vmlinuz" ] || [ -z "$config" ]; then
  die "fetch-kernel: $pkg has no boot/vmlinuz-* or boot/config-*"
fi
kver=${vmlinuz##*/vmlinuz-}

# config_value OPTION: y, m or empty.
config_value() { sed -n "s/^$1=//p" "$config"; }

# Needed built in: without them the guest cannot boot this way at all.
for opt in CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP CONFIG_DEVTMPFS CONFIG_SERIAL_8250_CONSOLE; do
  [ "$(config_value $opt)" = y ] || die "fetch-kernel: $pkg: $opt is not built in (=y)"
done

# The TPM drivers: built in, or modules we load from the initramfs.
modules=()
for pair in CONFIG_TCG_TPM:tpm CONFIG_TCG_TIS:tpm_tis CONFIG_TCG_CRB:tpm_crb; do
  opt=${pair%%:*} mod=${pair##*:}
  case "$(config_value "$opt")" in
    y) echo "fetch-kernel: $opt=y ($mod built in)" ;;
    m) echo "fetch-kernel: $opt=m ($mod is a module; it goes into the initramfs)"; modules+=("$mod") ;;
    *) die "fetch-kernel: $pkg: $opt is not set; the guest would have no $mod driver" ;;
  esac
done

# Resolve the modules to .ko paths in load order, dependencies first. The
# package ships no modules.dep (depmod makes it at install time), so read
# each module's "depends=" entry from its .modinfo section directly.
moddir="$kdir/lib/modules/$kver"
ko_path() { # MODULE: path under $moddir ("-" and "_" are the same in names)
  local p
  p=$(find "$moddir" -name "$1.ko*" -o -name "$(echo "$1" | tr _ -).ko*" | head -n 1)
  [ -n "$p" ] || die "fetch-kernel: module $1 not found under $moddir"
  echo "${p#"$moddir"/}"
}
ko_depends() { # PATH: the modules PATH depends on, space separated
  local f="$moddir/$1"
  case "$f" in
    *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
  esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}
resolve() { # MODULE LIST: appends it and its dependencies to LIST
  local ko dep
  ko=$(ko_path "$1")
  grep -qxF "$ko" "$2" && return 0
  for dep in $(ko_depends "$ko"); do resolve "$dep" "$2"; done
  echo "$ko" >> "$2"
}
: > "$KT_BUILD/guest-modules.tmp"
for mod in "${modules[@]}"; do resolve "$mod" "$KT_BUILD/guest-modules.tmp"; done

# virtio over PCI, for the virtio-tpm guests (kernel-tests/virtio-tpm-driver).
: > "$KT_BUILD/guest-virtio-modules.tmp"
case "$(config_value CONFIG_VIRTIO_PCI)" in
  y) echo "fetch-kernel: CONFIG_VIRTIO_PCI=y (built in)" ;;
  m) resolve virtio_pci "$KT_BUILD/guest-virtio-modules.tmp"
     echo "fetch-kernel: CONFIG_VIRTIO_PCI=m: $(sed 's|.*/||' "$KT_BUILD/guest-virtio-modules.tmp" | tr '\n' ' ')" ;;
  *) echo "fetch-kernel: CONFIG_VIRTIO_PCI is not set: no virtio-tpm guests with this kernel" ;;
esac

cp "$vmlinuz" "$KT_BUILD/vmlinuz.tmp" && mv "$KT_BUILD/vmlinuz.tmp" "$KT_BUILD/vmlinuz"
cp "$config" "$KT_BUILD/kernel-config"
mv "$KT_BUILD/guest-modules.tmp" "$KT_BUILD/guest-modules"
mv "$KT_BUILD/guest-virtio-modules.tmp" "$KT_BUILD/guest-virtio-modules"
echo "$pkg ($kver)" > "$stamp"
echo "fetch-kernel: $KT_BUILD/vmlinuz from $pkg; modules for the initramfs: $(wc -l < "$KT_BUILD/guest-modules")"
