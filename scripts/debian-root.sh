# scripts/debian-root.sh: a minimal Debian root with a few packages, for a
# program newer than bookworm's (QEMU 11 for the kernel tests, sid's swtpm
# for the bench). Sourced (bash); needs debootstrap and root.
#
#   debian_root NAME ROOT SUITE LOG REFETCH MIRROR PACKAGE...
#
# debootstraps SUITE (--variant=minbase) into ROOT unless an earlier run
# finished that step (marker ROOT/.vtpm-debootstrapped) and REFETCH is
# empty, then installs PACKAGE... with apt inside it (no recommends). MIRROR
# empty means the Debian mirror the host's apt sources use (deb.debian.org
# by default), so nothing but the Debian registry is contacted. Output goes
# to LOG; messages start with NAME. Returns non-zero (after showing the end
# of LOG) when a step fails.

# The host's Debian mirror: the first http(s) URI of a "debian" archive in
# the apt sources (one-line or deb822 format) that is not the security one.
debian_mirror() {
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -o 'https\?://[^[:space:]]*/debian/\?' | grep -v -e security -e ports | head -n 1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

debian_root() {
  local name=$1 root=$2 suite=$3 log=$4 refetch=$5 mirror=${6:-$(debian_mirror)}
  shift 6
  command -v debootstrap >/dev/null || { echo "$name: debootstrap missing (bash scripts/install-deps.sh)" >&2; return 1; }
  mkdir -p "$(dirname "$log")"
  if [ -n "$refetch" ] || [ ! -f "$root/.vtpm-debootstrapped" ]; then
    echo "$name: debootstrap --variant=minbase $suite $root $mirror"
    rm -rf "$root"
    if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "$name: debootstrap failed (log: $log)" >&2
      return 1
    fi
    touch "$root/.vtpm-debootstrapped"
  else
    echo "$name: reusing the $suite root from an earlier debootstrap"
  fi
  # apt inside the root; a private mount namespace so nothing stays mounted.
  # Check-Valid-Until=false: a registry may serve a frozen snapshot of the
  # archive whose Release file has passed its Valid-Until date (the case on
  # the machines this was written on); signatures are still checked.
  echo "$name: installing $* in the $suite root"
  cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"   # start no services
  chmod 755 "$root/usr/sbin/policy-rc.d"
  if ! unshare --mount --propagation private -- sh -c '
    set -e
    root=$1; shift
    mount --rbind /dev "$root/dev"; mount -t proc proc "$root/proc"; mount -t sysfs sysfs "$root/sys"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive sh -c "apt-get -o Acquire::Check-Valid-Until=false update -q && apt-get install -y -q --no-install-recommends $* && apt-get clean"
  ' prepare "$root" "$@" >> "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "$name: installing $* in $root failed (log: $log)" >&2
    return 1
  fi
}
