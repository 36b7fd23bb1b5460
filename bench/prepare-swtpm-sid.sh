#!/usr/bin/env bash
# prepare-swtpm-sid.sh: the newest Debian swtpm (sid: swtpm and libtpms
# 0.10.x) as a second reference for `make bench`, without touching the
# system's swtpm 0.7.1. sid's swtpm needs sid's C library and OpenSSL, so
# it runs from a minimal sid root of its own:
#
#   debootstrap --variant=minbase sid build/swtpm-sid/root MIRROR
#   chroot root: apt-get install --no-install-recommends swtpm
#
# (scripts/debian-root.sh; MIRROR is the Debian mirror the host's apt
# sources use, so nothing but the Debian registry is contacted). Leaves
#
#   build/swtpm-sid/swtpm     a wrapper called exactly like `swtpm`: it
#       enters a private mount namespace (unshare -m), bind-mounts
#       SWTPM_SID_DIRS (default "/tmp /run /dev /proc") at their own paths
#       inside the root, chroots and execs the root's swtpm, so
#       state directories and socket paths on its command line mean what
#       they mean on the host, and swtpm keeps the process id the wrapper
#       started with (kill, wait and /proc/PID work as with a plain binary).
#       SWTPM_SID_EXEC runs another program of the root instead (the bench
#       uses /bin/true to time the wrapper alone).
#   build/swtpm-sid/version   `swtpm --version` of the root's swtpm
#
# Cached: does nothing when the root is complete (SWTPM_SID_REFETCH=1 redoes
# it). Separate from the QEMU 11 root (kernel-tests/prepare-qemu11.sh) so
# that neither depends on the other. Needs debootstrap
# (scripts/install-deps.sh) and root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
dir=${SWTPM_SID_DIR:-$repo/build/swtpm-sid}
root="$dir/root"
wrapper="$dir/swtpm"
stamp="$root/.vtpm-prepared"
suite=${SWTPM_SID_SUITE:-sid}

die() { echo "prepare-swtpm-sid: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount namespaces)"

write_wrapper() {
  mkdir -p "$dir"
  {
    echo '#!/bin/sh'
    echo '# swtpm from the Debian sid root made by bench/prepare-swtpm-sid.sh, run'
    echo '# in a private mount namespace, chrooted, with host directories'
    echo '# bind-mounted at their own paths (they vanish with the namespace).'
    echo '# Every step is exec, so swtpm keeps the wrapper'"'"'s process id.'
    printf 'ROOT=%q\n' "$root"
    cat <<'EOF'
if [ -z "${SWTPM_SID_NS:-}" ]; then
  SWTPM_SID_NS=1 exec unshare --mount --propagation private -- "$0" "$@"
fi
unset SWTPM_SID_NS
set -e
for d in ${SWTPM_SID_DIRS:-/tmp /run /dev /proc}; do
  [ -d "$d" ] || continue
  mkdir -p "$ROOT$d"
  mount --bind "$d" "$ROOT$d"
done
cwd=$PWD
[ -d "$ROOT$cwd" ] || cwd=/
exec chroot "$ROOT" /bin/sh -c 'cd "$0" && exec "${SWTPM_SID_EXEC:-/usr/bin/swtpm}" "$@"' "$cwd" "$@"
EOF
  } > "$wrapper.tmp"
  chmod 755 "$wrapper.tmp"
  mv "$wrapper.tmp" "$wrapper"
}

if [ -z "${SWTPM_SID_REFETCH:-}" ] && [ -f "$stamp" ] && [ -x "$root/usr/bin/swtpm" ]; then
  write_wrapper
  if "$wrapper" --version > "$dir/version" 2>&1; then
    echo "prepare-swtpm-sid: cached $(head -n 1 "$dir/version") in $root"
    exit 0
  fi
  echo "prepare-swtpm-sid: the cached root's swtpm does not run; rebuilding"
fi

source "$repo/scripts/debian-root.sh"
log="$dir/prepare.log"
start=$(date +%s)
debian_root prepare-swtpm-sid "$root" "$suite" "$log" "${SWTPM_SID_REFETCH:-}" "${SWTPM_SID_MIRROR:-}" swtpm ||
  die "no swtpm root"

write_wrapper
"$wrapper" --version > "$dir/version" 2>&1 || die "the root's swtpm does not run: $(cat "$dir/version")"
head -n 1 "$dir/version" > "$stamp"
echo "prepare-swtpm-sid: $(head -n 1 "$dir/version") in $root ($(du -sh "$root" | cut -f1), $(($(date +%s) - start)) s)"
