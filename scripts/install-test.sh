#!/usr/bin/env bash
# install-test.sh (`make install-test`, part of `make test`): `make install`
# into scratch directories and checks what it put there.
#
#   1. DESTDIR install (PREFIX /usr/local): exactly the expected files, the
#      swtpm links resolve to the installed binaries, the unit's ExecStart
#      names the installed vtpmd;
#   2. every man page renders without a warning
#      (MANWIDTH=80 man --warnings -l) and documents every option the
#      program's --help lists;
#   3. PREFIX install (no DESTDIR): systemd-analyze verify accepts the unit;
#      vtpm-libvirt enable / status / disable on a scratch unit directory;
#   4. make uninstall leaves nothing behind, in both.
#
# Output: PASS/FAIL lines, then "N passed, M failed"; exit 1 on a failure.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
passed=0 failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

work=$(mktemp -d /tmp/vtpm-install-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
dest=$work/dest

bins="vtpmd vtpmctl vtpm-setup"
expected() {
  local b
  for b in $bins vtpm-libvirt; do echo "usr/local/bin/$b"; done
  for b in $bins vtpm-libvirt; do echo "usr/local/share/man/man8/$b.8"; done
  echo usr/local/lib/systemd/system/vtpmd@.service
  echo usr/local/lib/vtpmd/swtpm/swtpm
  echo usr/local/lib/vtpmd/swtpm/swtpm_ioctl
  echo usr/local/lib/vtpmd/swtpm/swtpm_setup
}

# 1. DESTDIR install
if make -s install DESTDIR="$dest" >"$work/install.log" 2>&1; then
  pass "make install DESTDIR=... succeeded"
else
  fail "make install DESTDIR=... failed: $(tail -n 5 "$work/install.log")"
fi
got=$(cd "$dest" && find . \( -type f -o -type l \) | sed 's|^\./||' | sort)
want=$(expected | sort)
if [ "$got" = "$want" ]; then
  pass "installed files are exactly: $(echo "$want" | tr '\n' ' ')"
else
  fail "installed files differ: $(diff <(echo "$want") <(echo "$got") | grep '^[<>]' | tr '\n' ' ')"
fi
for l in swtpm:vtpmd swtpm_ioctl:vtpmctl swtpm_setup:vtpm-setup; do
  link=$dest/usr/local/lib/vtpmd/swtpm/${l%%:*}
  [ -L "$link" ] || continue
  check "link ${l%%:*} leads to the installed ${l#*:} ($(readlink "$link"))" \
    test "$(readlink -f "$link")" = "$(readlink -f "$dest/usr/local/bin/${l#*:}")"
done
check "installed binaries are executable" test -x "$dest/usr/local/bin/vtpmd" -a -x "$dest/usr/local/bin/vtpmctl" -a -x "$dest/usr/local/bin/vtpm-libvirt"
unit=$dest/usr/local/lib/systemd/system/vtpmd@.service
check "unit ExecStart runs /usr/local/bin/vtpmd socket" grep -q '^ExecStart=/usr/local/bin/vtpmd socket ' "$unit"
check "no @...@ placeholder left in the unit or vtpm-libvirt" \
  bash -c "! grep -q '@[A-Z_]*@' '$unit' '$dest/usr/local/bin/vtpm-libvirt'"

# 2. man pages
# options PROGRAM...: the long options its --help lists (subcommands too).
options() { "$@" --help 2>/dev/null | grep -oE '(^|[ ,])--[a-z][a-z0-9-]*' | sed 's/^[ ,]*//' | sort -u; }
for page in "$dest"/usr/local/share/man/man8/*.8; do
  name=$(basename "$page" .8)
  err=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
  if [ -z "$err" ]; then pass "man $name renders without warnings"
  else fail "man $name: $(echo "$err" | head -n 3 | tr '\n' ' ')"; fi
  text=$(MANWIDTH=200 man -l "$page" 2>/dev/null)
  case $name in
    vtpmd) opts=$( { options target/release/vtpmd socket; options target/release/vtpmd vhost-user; } | sort -u) ;;
    vtpmctl) opts=$(for c in keygen incoming-info incoming-key outgoing status receipt complete abort saves rollback-policy allow-rollback; do options target/release/vtpmctl "$c"; done
                    target/release/vtpmctl swtpm-ioctl --help | grep -oE '^--[a-z-]+' | sort -u) ;;
    vtpm-setup) opts=$(options target/release/vtpm-setup) ;;
    *) opts= ;;
  esac
  missing=
  for o in $opts; do
    grep -qF -- "$o" <<<"$text" || missing="$missing $o"
  done
  if [ -z "$missing" ]; then pass "man $name documents every option --help lists ($(echo $opts | wc -w))"
  else fail "man $name lacks:$missing"; fi
done

# 3. PREFIX install: a runnable tree
prefix=$work/prefix
make -s install PREFIX="$prefix" >"$work/install2.log" 2>&1 || fail "make install PREFIX=... failed: $(tail -n 5 "$work/install2.log")"
if command -v systemd-analyze >/dev/null; then
  # systemd-analyze checks the unit's syntax and that ExecStart exists.
  cp "$prefix/lib/systemd/system/vtpmd@.service" "$work/vtpmd@vm1.service"
  err=$(MANPATH=$prefix/share/man systemd-analyze verify "$work/vtpmd@vm1.service" 2>&1 | grep -v -e 'Failed to open /etc/systemd/system' -e 'Cannot add dependency job' || true)
  if [ -z "$err" ]; then pass "systemd-analyze verify accepts vtpmd@.service"
  else fail "systemd-analyze verify: $(echo "$err" | head -n 3 | tr '\n' ' ')"; fi
fi
units=$work/units
helper=$prefix/bin/vtpm-libvirt
export VTPM_LIBVIRT_UNIT_DIR=$units
export VTPM_HOST_KEY_DIR=$work/hostkey
out=$("$helper" status)
check "vtpm-libvirt status: disabled before enable" grep -q 'libvirt emulator backend: disabled' <<<"$out"
"$helper" enable >/dev/null
dropin=$units/libvirtd.service.d/50-vtpmd.conf
check "vtpm-libvirt enable made the host key (0600) vtpmd seals saves to" test "$(stat -c %a "$work/hostkey/host-key.pem")" = 600
check "vtpm-libvirt enable wrote the libvirtd and virtqemud drop-ins" test -f "$dropin" -a -f "$units/virtqemud.service.d/50-vtpmd.conf"
check "drop-in puts the link directory first in PATH" grep -qx "Environment=\"PATH=$prefix/lib/vtpmd/swtpm:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"" "$dropin"
check "vtpm-libvirt path matches the drop-in" test "Environment=\"$("$helper" path)\"" = "$(grep '^Environment=' "$dropin")"
out=$("$helper" status)
check "vtpm-libvirt status: enabled, swtpm -> vtpmd, swtpm_ioctl -> vtpmctl" \
  bash -c "grep -q 'backend: enabled' <<<'$out' && grep -q 'swtpm -> .*($prefix/bin/vtpmd)' <<<'$out' && grep -q 'swtpm_ioctl -> .*($prefix/bin/vtpmctl)' <<<'$out'"
"$helper" enable >/dev/null 2>&1
check "vtpm-libvirt enable twice is harmless" test "$(ls "$units/libvirtd.service.d")" = 50-vtpmd.conf
"$helper" disable >/dev/null
check "vtpm-libvirt disable removed the drop-ins and their directories" test ! -e "$units/libvirtd.service.d" -a ! -e "$units/virtqemud.service.d"
mkdir -p "$units/libvirtd.service.d" && echo "[Service]" >"$dropin"
if "$helper" enable >/dev/null 2>"$work/err"; then fail "vtpm-libvirt enable overwrote a drop-in it did not write"
else check "vtpm-libvirt enable leaves a foreign drop-in alone and says so" grep -q 'not written by vtpm-libvirt' "$work/err"; fi
if "$helper" disable >/dev/null 2>"$work/err"; then fail "vtpm-libvirt disable removed a drop-in it did not write"
else check "vtpm-libvirt disable leaves a foreign drop-in alone" test -f "$dropin"; fi
rm -rf "$units"
mv "$prefix/lib/vtpmd/swtpm/swtpm" "$work/swtpm.link"
if "$helper" enable >/dev/null 2>"$work/err"; then fail "vtpm-libvirt enable with a missing link"
else check "vtpm-libvirt enable refuses when a link is missing, naming it" grep -q "swtpm/swtpm is missing" "$work/err"; fi
mv "$work/swtpm.link" "$prefix/lib/vtpmd/swtpm/swtpm"
unset VTPM_LIBVIRT_UNIT_DIR VTPM_HOST_KEY_DIR

# 4. uninstall
make -s uninstall DESTDIR="$dest" >/dev/null 2>&1
left=$(cd "$dest" && find . \( -type f -o -type l \) | sed 's|^\./||')
check "make uninstall DESTDIR=... removed every file${left:+ (left: $left)}" test -z "$left"
check "make uninstall removed the link directory" test ! -e "$dest/usr/local/lib/vtpmd"
make -s uninstall PREFIX="$prefix" >/dev/null 2>&1
left=$(cd "$prefix" && find . \( -type f -o -type l \) | sed 's|^\./||')
check "make uninstall PREFIX=... removed every file${left:+ (left: $left)}" test -z "$left"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
