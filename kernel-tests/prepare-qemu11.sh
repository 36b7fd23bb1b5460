#!/usr/bin/env bash
# prepare-qemu11.sh: QEMU 11 for the kernel tests, without touching the
# system's QEMU. Debian bookworm ships QEMU 7.2; QEMU 11.1 (which has the
# user-creatable generic vhost-user device, vhost-user-test-device-pci) is in
# Debian sid and needs sid's C library, so it runs from a minimal sid root:
#
#   debootstrap --variant=minbase sid build/kernel-tests/qemu11/root MIRROR
#   chroot root: apt-get install --no-install-recommends qemu-system-x86
#
# MIRROR is the Debian mirror the host's apt sources use (deb.debian.org by
# default), so no network beyond the Debian registry is needed. Leaves
#
#   build/kernel-tests/qemu11/qemu-system-x86_64   a wrapper that runs the
#       root's QEMU in a private mount namespace (unshare -m) chrooted into
#       the root, with /dev, /proc, /sys, /tmp, /run, the repository and
#       KT_BUILD bind-mounted at their own paths, so every path on QEMU's
#       command line (kernel, sockets, logs) means what it means on the host.
#       QEMU keeps the wrapper's process id (everything is exec'ed), so
#       `timeout`, kill and wait work as with a plain binary. QEMU11_BIND
#       adds more directories (space separated).
#   build/kernel-tests/qemu11/version               `qemu-system-x86_64 --version`
#
# Cached: does nothing when the root is complete (QEMU11_REFETCH=1 redoes it).
# QEMU11_SUITE (default sid) picks the Debian suite; QEMU11_MIN (default 11.1)
# is the lowest QEMU version accepted.
# Needs debootstrap (scripts/install-deps.sh installs it) and root.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

dir="$KT_BUILD/qemu11"
root="$dir/root"
wrapper="$dir/qemu-system-x86_64"
suite=${QEMU11_SUITE:-sid}
min=${QEMU11_MIN:-11.1}
stamp="$root/.vtpm-prepared"

[ "$(id -u)" -eq 0 ] || die "prepare-qemu11: needs root (debootstrap, chroot, mount namespaces)"

write_wrapper() {
  mkdir -p "$dir"
  {
    echo '#!/bin/sh'
    echo '# Runs QEMU from the Debian root made by kernel-tests/prepare-qemu11.sh, in a'
    echo '# private mount namespace, chrooted, with host directories bind-mounted at'
    echo '# their own paths. The mounts vanish with the namespace when QEMU exits;'
    echo '# every step is exec, so QEMU keeps the process id this script started with.'
    printf 'ROOT=%q\nDIRS=%q\n' "$root" "$KT_ROOT $KT_BUILD /tmp /run"
    cat <<'EOF'
if [ -z "${QEMU11_NS:-}" ]; then
  QEMU11_NS=1 exec unshare --mount --propagation private -- "$0" "$@"
fi
unset QEMU11_NS
set -e
# Plain binds first (the repository holds the root itself), then the
# kernel's file systems with their submounts.
for d in $DIRS ${QEMU11_BIND:-}; do
  [ -d "$d" ] || continue
  mkdir -p "$ROOT$d"
  mount --bind "$d" "$ROOT$d"
done
for d in /dev /proc /sys; do mount --rbind "$d" "$ROOT$d"; done
cwd=$PWD
[ -d "$ROOT$cwd" ] || cwd=/
exec chroot "$ROOT" /bin/sh -c 'cd "$0" && exec /usr/bin/qemu-system-x86_64 "$@"' "$cwd" "$@"
EOF
  } > "$wrapper.tmp"
  chmod 755 "$wrapper.tmp"
  mv "$wrapper.tmp" "$wrapper"
}

version_ok() { # VERSION-STRING: at least $min?
  local v
  v=$(echo "$1" | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n 1)
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$min" "$v" | sort -V | head -n 1)" = "$min" ]
}

if [ -z "${QEMU11_REFETCH:-}" ] && [ -f "$stamp" ] && [ -x "$root/usr/bin/qemu-system-x86_64" ]; then
  write_wrapper
  "$wrapper" --version > "$dir/version" 2>&1 || true
  if version_ok "$(cat "$dir/version")"; then
    echo "prepare-qemu11: cached $(head -n 1 "$dir/version") in $root"
    exit 0
  fi
  echo "prepare-qemu11: cached root does not run a QEMU >= $min; rebuilding"
fi

source "$KT_ROOT/scripts/debian-root.sh"
log="$dir/prepare.log"
start=$(date +%s)
debian_root prepare-qemu11 "$root" "$suite" "$log" "${QEMU11_REFETCH:-}" "${QEMU11_MIRROR:-}" qemu-system-x86 ||
  die "prepare-qemu11: no QEMU root"

write_wrapper
"$wrapper" --version > "$dir/version" 2>&1 || true
version_ok "$(cat "$dir/version")" || die "prepare-qemu11: $suite's QEMU is not >= $min: $(head -n 1 "$dir/version")"
"$wrapper" -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"' ||
  die "prepare-qemu11: $(head -n 1 "$dir/version") has no vhost-user-test-device-pci"
head -n 1 "$dir/version" > "$stamp"
echo "prepare-qemu11: $(head -n 1 "$dir/version") in $root ($(du -sh "$root" | cut -f1), $(($(date +%s) - start)) s)"
