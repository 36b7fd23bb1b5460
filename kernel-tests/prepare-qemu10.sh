#!/usr/bin/env bash
# prepare-qemu10.sh: QEMU 10.0 from Debian bookworm-backports for the kernel
# tests, next to the system's QEMU 7.2 and without touching it. The packages
# are downloaded with a private apt configuration (its own sources list and
# package lists under the cache directory; /etc/apt is not changed) and
# unpacked with `dpkg-deb -x`, never installed:
#
#   qemu-system-x86, qemu-system-common, qemu-system-data   (10.0.x~bpo12)
#   qemu-system-modules-opengl, -spice                      (modules it loads at start)
#   seabios                                                 (the BIOS QEMU 10.0 wants)
#
# The binary links only against libraries bookworm has (checked with ldd;
# the ones the system's QEMU 7.2 uses), so it runs as it is: no
# LD_LIBRARY_PATH. Leaves
#
#   build/kernel-tests/qemu10/root/        the unpacked packages
#   build/kernel-tests/qemu10/env          to be sourced: exports QEMU (the
#       binary), QEMU_L (its data directories, passed as -L by lib.sh and
#       ktguest.py: ROMs, keymaps, the BIOS) and QEMU_MODULE_DIR (its own
#       modules, not the system QEMU's)
#   build/kernel-tests/qemu10/version      `qemu-system-x86_64 --version`
#
# Cached: does nothing when the root is complete (QEMU10_REFETCH=1 redoes
# it). QEMU10_SUITE (bookworm-backports) picks the suite, QEMU10_VERSION
# (10.0) the upstream version the package must have, QEMU10_MIRROR the
# mirror (default: the host's Debian mirror).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

dir="$KT_BUILD/qemu10"
root="$dir/root"
apt_dir="$dir/apt"
debs="$dir/debs"
suite=${QEMU10_SUITE:-bookworm-backports}
want=${QEMU10_VERSION:-10.0}
stamp="$root/.vtpm-prepared"
# The modules: QEMU loads ui-opengl and ui-spice-core at start-up from
# QEMU_MODULE_DIR or else from the system QEMU's module directory, whose
# 7.2 builds it refuses with an error message.
STARTUP_MODULES="ui-opengl ui-spice-core"
packages="qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-opengl qemu-system-modules-spice seabios"
bin="$root/usr/bin/qemu-system-x86_64"

write_env() {
  printf 'export QEMU=%q\nexport QEMU_L=%q\nexport QEMU_MODULE_DIR=%q\n' \
    "$bin" "$root/usr/share/qemu $root/usr/share/seabios" "$root/usr/lib/x86_64-linux-gnu/qemu" > "$dir/env"
}

# runs_ok: the unpacked QEMU is $want.x and starts a paused test machine
# with the tests' data directories and quits without a word on stderr (a
# module or ROM from the system's QEMU 7.2 would be reported there). Sets
# complaint.
runs_ok() {
  complaint="no $bin"
  [ -x "$bin" ] || return 1
  (source "$dir/env" && "$QEMU" --version) > "$dir/version" 2>&1
  complaint="not QEMU $want: $(head -n 3 "$dir/version")"
  grep -q "^QEMU emulator version ${want//./\\.}\." "$dir/version" || return 1
  complaint=$( (source "$dir/env"; L=(); for d in $QEMU_L; do L+=(-L "$d"); done
    printf 'quit\n' | timeout 60 "$QEMU" "${L[@]}" -accel tcg -m 64 -display none -nic none \
      -serial none -monitor stdio -S 2>&1 >/dev/null) ) || complaint="it did not start a machine: $complaint"
  [ -z "$complaint" ]
}

if [ -z "${QEMU10_REFETCH:-}" ] && [ -f "$stamp" ]; then
  write_env
  if runs_ok; then
    echo "prepare-qemu10: cached $(head -n 1 "$dir/version") in $root"
    exit 0
  fi
  echo "prepare-qemu10: the cached QEMU 10 does not run right ($complaint); fetching again"
fi

# The host's Debian mirror (as prepare-qemu11.sh finds it).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
  grep -v '^[[:space:]]*#' | grep -o 'https\?://[^[:space:]]*/debian/\?' | grep -v -e security -e ports | head -n 1 || true)
mirror=${QEMU10_MIRROR:-${mirror:-http://deb.debian.org/debian}}

start=$(date +%s)
log="$dir/prepare.log"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$apt_dir/sources.list"
# Only this sources list and these package lists; signatures are checked.
# Check-Valid-Until=false: a registry may serve a frozen snapshot whose
# Release file has passed its Valid-Until date (see prepare-qemu11.sh).
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/none"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root -q)

echo "prepare-qemu10: apt-get update for $suite ($mirror), private lists in $apt_dir"
apt-get "${apt_opts[@]}" update > "$log" 2>&1 || { tail -n 20 "$log" >&2; die "prepare-qemu10: apt-get update failed (log: $log)"; }

version=$(apt-cache "${apt_opts[@]}" madison qemu-system-x86 2>>"$log" | awk -F'|' -v s="$suite" '$3 ~ s {gsub(/ /, "", $2); print $2; exit}')
case "$version" in
  *:"$want".*) ;;
  "") die "prepare-qemu10: $suite has no qemu-system-x86 (log: $log)" ;;
  *) die "prepare-qemu10: $suite has qemu-system-x86 $version, not $want.x (set QEMU10_VERSION)" ;;
esac

rm -f "$debs"/*.deb
targets=()
for p in $packages; do targets+=("$p/$suite"); done
echo "prepare-qemu10: downloading $packages ($suite, qemu $version)"
(cd "$debs" && apt-get "${apt_opts[@]}" download "${targets[@]}") >> "$log" 2>&1 ||
  { tail -n 20 "$log" >&2; die "prepare-qemu10: apt-get download failed (log: $log)"; }

rm -rf "$root"
mkdir -p "$root"
for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done

# Every library the binary and the modules it loads at start need must
# resolve on this system; other modules (devices the tests do not use) only
# get a note.
lacks() { ldd "$@" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' '; }
missing=$(lacks "$bin" $(for m in $STARTUP_MODULES; do echo "$root/usr/lib/x86_64-linux-gnu/qemu/$m.so"; done))
[ -z "$missing" ] || die "prepare-qemu10: QEMU 10 needs libraries this system lacks: $missing(install the qemu-system-x86 dependencies: bash scripts/install-deps.sh)"
for so in "$root"/usr/lib/x86_64-linux-gnu/qemu/*.so; do
  m=$(lacks "$so")
  [ -z "$m" ] || echo "prepare-qemu10: note: module $(basename "$so") is unusable here (lacks ${m% }); the tests do not load it"
done

write_env
runs_ok || die "prepare-qemu10: the unpacked QEMU does not run right: $complaint"
head -n 1 "$dir/version" > "$stamp"
echo "prepare-qemu10: $(head -n 1 "$dir/version") in $root ($(du -sh "$root" | cut -f1), $(($(date +%s) - start)) s)"
