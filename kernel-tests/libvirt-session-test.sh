#!/usr/bin/env bash
# libvirt-session-test.sh: libvirt's own TPM backend (<backend type='emulator'>)
# running vtpm-setup as swtpm_setup and vtpmd as swtpm.
#
# A session-mode libvirtd (qemu:///session, started by virsh as an
# unprivileged user, everything under a temporary HOME, nothing in /etc or
# /run) finds `swtpm_setup` and `swtpm` first in its PATH: symlinks to
# vtpm-setup and vtpmd. Session mode makes libvirt also run
# `swtpm_setup --create-config-files skip-if-exist`, so the local CA lives
# under the user's config directory.
#
#   1. a TCG guest (tpm-crb) runs the tpm2-tools scenario (first boot):
#      libvirt provisioned the TPM with vtpm-setup; the EK certificate in
#      its NV verifies against the user's local CA;
#   2. the same domain again (destroy/start): the scenario's second half
#      finds the keys and NV of the first;
#   3. an encrypted domain (<encryption secret=...>) with <active_pcr_banks>:
#      vtpm-setup provisions with --pwdfile-fd and reconfigures the banks,
#      vtpmd serves it, the guest passes, the state holds no plaintext.
#
# Env: TPM_BACKEND_BIN (vtpmd; vtpm-setup next to it), KT_BUILD (kernel +
# initramfs), KT_USER (default nobody; run as root, or as that user).
# Prints "N passed, M failed"; exits 1 on any failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VTPMD=${TPM_BACKEND_BIN:-$here/../target/release/vtpmd}
SETUP=$(dirname "$VTPMD")/vtpm-setup
KT_BUILD=${KT_BUILD:-$here/../build/kernel-tests}
USER_NAME=${KT_USER:-nobody}
UUID=0d4c1a7e-5a3b-4f6e-8c2d-9e8f7a6b5c4d
SECRET=6dd3e4a5-1d76-44ce-961f-f119f5aad935
pass=0 fail=0
check() { # OK WHAT [DETAIL]
  if [ "$1" = yes ]; then echo "PASS: $2"; pass=$((pass + 1)); else echo "FAIL: $2 ${3:-}"; fail=$((fail + 1)); fi
}

for b in "$VTPMD" "$SETUP" "$KT_BUILD/vmlinuz" "$KT_BUILD/initramfs.cpio.gz"; do
  [ -e "$b" ] || { echo "libvirt-session-test: $b is missing" >&2; exit 1; }
done
command -v virsh >/dev/null || { echo "libvirt-session-test: virsh not installed" >&2; exit 1; }

# Everything the user's libvirt touches lives here, owned by that user
# (binaries and the guest copied in: the build tree may not be readable).
W=$(mktemp -d /tmp/vtpm-libvirt.XXXXXX)
mkdir -p "$W/bin" "$W/home" "$W/run"
cp "$VTPMD" "$W/bin/vtpmd"
cp "$SETUP" "$W/bin/vtpm-setup"
ln -s vtpmd "$W/bin/swtpm"
ln -s vtpm-setup "$W/bin/swtpm_setup"
cp "$KT_BUILD/vmlinuz" "$KT_BUILD/initramfs.cpio.gz" "$W/"
chmod 700 "$W/run"

domain() { # MODE [TPM-BACKEND-INNER-XML]
  cat <<EOF
<domain type='qemu'>
  <name>vtpm-libvirt</name>
  <uuid>$UUID</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$W/vmlinuz</kernel>
    <initrd>$W/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=3 vtpm.mode=$1</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <serial type='file'><source path='$W/serial.log'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'>${2:-}</backend></tpm>
  </devices>
</domain>
EOF
}
domain first > "$W/first.xml"
domain second > "$W/second.xml"
domain first "<encryption secret='$SECRET'/><active_pcr_banks><sha256/><sha384/></active_pcr_banks>" > "$W/enc.xml"
cat > "$W/secret.xml" <<EOF
<secret ephemeral='no' private='yes'>
  <uuid>$SECRET</uuid>
  <usage type='vtpm'><name>vtpm-libvirt-test</name></usage>
</secret>
EOF
chown -R "$USER_NAME" "$W"

as_user() { # COMMAND...: runs with the test's HOME/XDG dirs and PATH
  local env=(HOME="$W/home" XDG_CONFIG_HOME="$W/home/.config" XDG_CACHE_HOME="$W/home/.cache"
    XDG_RUNTIME_DIR="$W/run" PATH="$W/bin:/usr/sbin:/usr/bin:/sbin:/bin")
  if [ "$(id -u)" -eq 0 ] && [ "$USER_NAME" != root ]; then
    runuser -u "$USER_NAME" -- env "${env[@]}" "$@"
  else
    env "${env[@]}" "$@"
  fi
}
virsh_() { as_user virsh -q -c qemu:///session "$@"; }

cleanup() {
  virsh_ destroy vtpm-libvirt >/dev/null 2>&1 || true
  virsh_ undefine vtpm-libvirt --tpm >/dev/null 2>&1 || true
  virsh_ secret-undefine "$SECRET" >/dev/null 2>&1 || true
  for p in "$W/run/libvirt/libvirtd.pid" "$W/run/libvirt/virtlogd.pid"; do
    [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
  done
  sleep 1
  rm -rf "$W"
}
trap cleanup EXIT

# Checks a boot in MODE must pass: guest-init's own, then the scenario's.
expected() { # MODE
  local guest scenario
  guest=$(sed -n 's/^GUEST_CHECKS="\(.*\)"/\1/p' "$here/guest-init" | wc -w)
  scenario=$(busybox sh "$here/scenario/tpm2-scenario.sh" --list "$1" | wc -l)
  echo $((guest + scenario))
}

boot() { # XML NAME MODE: defines, starts, waits for the guest to power off
  : > "$W/serial.log"
  virsh_ define "$W/$1" >/dev/null
  if ! as_user timeout 120 virsh -q -c qemu:///session start vtpm-libvirt >"$W/start.out" 2>&1; then
    check no "$2: virsh start" "$(cat "$W/start.out")"
    return 1
  fi
  for _ in $(seq 1 300); do
    virsh_ domstate vtpm-libvirt 2>/dev/null | grep -q "shut off" && break
    sleep 1
  done
  local passed failed want
  passed=$(grep -c "^VTPM-TEST .* PASS" "$W/serial.log" || true)
  failed=$(grep "^VTPM-TEST .* FAIL" "$W/serial.log" || true)
  want=$(expected "$3")
  check "$([ "$passed" -eq "$want" ] && [ -z "$failed" ] && grep -q VTPM-DONE "$W/serial.log" && echo yes)" \
    "$2: guest scenario ($passed of $want checks passed)" "$failed"
}

state_dir() { echo "$W/home/.config/libvirt/qemu/swtpm/$UUID/tpm2"; }
swtpm_log() { cat "$W/home/.cache/libvirt/qemu/log/vtpm-libvirt-swtpm.log" 2>/dev/null; }

# The EK certificate in the state's NV (served by vtpmd over TCP), checked
# against the user's local CA. KEYARG: vtpmd's --key for an encrypted state.
ek_cert_verifies() { # KEYARG...
  local port=$((21000 + $$ % 4000 * 2)) st ca pid ok=no
  st=$(state_dir)
  ca="$W/home/.config/var/lib/swtpm-localca"
  # As the domain's user: files vtpmd rewrites must stay readable to it.
  rm -f "$W/vtpmd.pid"
  as_user "$W/bin/vtpmd" socket --tpm2 --tpmstate "dir=$st" --flags not-need-init,startup-clear \
    --server "type=tcp,port=$port,bindaddr=127.0.0.1" --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
    --pid "file=$W/vtpmd.pid" "$@" >"$W/vtpmd.out" 2>&1 &
  for _ in $(seq 1 50); do [ -s "$W/vtpmd.pid" ] && break; sleep 0.1; done
  pid=$(cat "$W/vtpmd.pid" 2>/dev/null || echo)
  if TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port" tpm2_nvread 0x1c00002 -C o -o "$W/ek.der" 2>/dev/null &&
    openssl x509 -inform der -in "$W/ek.der" -out "$W/ek.pem" &&
    openssl verify -CAfile "$ca/swtpm-localca-rootca-cert.pem" -untrusted "$ca/issuercert.pem" "$W/ek.pem" >/dev/null; then
    ok=yes
  fi
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  wait 2>/dev/null || true
  echo $ok
}

# 1. First boot: libvirt provisions with vtpm-setup, serves with vtpmd.
boot first.xml "plain domain, first boot" first || true
check "$(swtpm_log | grep -q 'Successfully created NVRAM area 0x1c00002' && echo yes)" \
  "libvirt ran vtpm-setup (EK certificate written)"
check "$(swtpm_log | grep -q 'vtpmd\[' && echo yes)" "libvirt ran vtpmd"
check "$([ -s "$W/home/.config/swtpm_setup.conf" ] && echo yes)" "session mode: --create-config-files wrote the user's config"
check "$(ek_cert_verifies)" "EK certificate in NV verifies against the user's local CA"

# 2. destroy/start: the second half of the scenario finds the first's keys and NV.
boot second.xml "plain domain, second boot" second || true

# 3. Encrypted domain with active PCR banks.
virsh_ undefine vtpm-libvirt --tpm >/dev/null
virsh_ secret-define "$W/secret.xml" >/dev/null
printf 'libvirt vtpm passphrase' > "$W/pass"
chown "$USER_NAME" "$W/pass"
virsh_ secret-set-value "$SECRET" --file "$W/pass" --plain >/dev/null
boot enc.xml "encrypted domain" first || true
check "$(swtpm_log | grep -q 'activated PCR banks sha256,sha384' && echo yes)" "<active_pcr_banks> applied by vtpm-setup --reconfigure"
check "$(grep -aq "vtpm-libvirt:$UUID" "$(state_dir)/tpm2-00.permall" && echo no || echo yes)" \
  "encrypted state holds no plaintext (the certificate's subject)"
check "$(ek_cert_verifies --key "pwdfile=$W/pass,mode=aes-256-cbc")" "encrypted EK certificate verifies with the domain's passphrase"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
