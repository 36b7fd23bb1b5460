#!/bin/sh
# tpm2-scenario.sh: the TPM scenario, tpm2-tools 5.4 against whatever
# TPM2TOOLS_TCTI points at. POSIX sh; runs under busybox sh inside the test
# guest (TCTI device:/dev/tpmrm0, kernel resource manager) and on the host
# (TCTI swtpm:host=127.0.0.1,port=N, no resource manager) alike. Needs only
# the tpm2_* tools and busybox applets (od, sha256sum, cmp, dd, head, tail,
# tr, cut, grep, wc, timeout).
#
#   tpm2-scenario.sh first WORKDIR    fresh TPM: keys, NV, PCR, quote, sessions
#   tpm2-scenario.sh second WORKDIR   same TPM state after a restart
#   tpm2-scenario.sh --list MODE      the check names of MODE, one per line
#
# Output, one line per check in the order of REGISTRY below:
#   VTPM-TEST <name> PASS
#   VTPM-TEST <name> FAIL <short reason>
# plus "VTPM-INFO <key> <value>" lines; the host compares
# persistent-key-sha256 and nv-sha256 between the first and second run.
# A failed check never stops the script; a check whose dependency failed
# prints "FAIL depends on <dependency>". Every tpm2 command's stdout/stderr
# is kept in WORKDIR as <step>.out / <step>.err (command line in <step>.cmd).
# Exit status: 0 if every check passed, 1 otherwise, 2 on usage errors.
#
# Environment:
#   TPM2TOOLS_TCTI        the TCTI (required in practice)
#   SCENARIO_TIMEOUT      seconds one tpm2 command may take (default 120)
#   SCENARIO_FLUSH        auto|always|never: flush transient objects after
#                         every command. auto = unless the TCTI is a resource
#                         manager (tpmrm, abrmd), which flushes by itself.

# ---------------------------------------------------------------------------
# The checks: mode, name, dependencies (comma separated, "-" for none). The
# only list of names: --list, the runner and the dependency logic read it.
# Check NAME is implemented by the function t_NAME ("-" becomes "_").
REGISTRY='
first   getrandom               -
first   pcr-extend-read         -
first   createprimary-rsa       -
first   createprimary-ecc       -
first   create-load             createprimary-rsa
first   sign-verify             create-load
first   nv-define-write-read    -
first   evictcontrol-sign       create-load
first   quote-checkquote        createprimary-ecc
first   session-start           createprimary-ecc
first   session-getrandom       session-start
first   session-nv-write-read   session-start,nv-define-write-read
first   session-flush           session-start
second  getrandom               -
second  nv-kept                 -
second  persistent-key-present  -
second  persistent-key-signs    persistent-key-present
second  pcr-reset               -
'

NV_INDEX=0x1500016
NV_SIZE=64
PERSIST=0x81000101
PCR=16

# The 64-byte NV pattern: awkward bytes first (NUL, 0xff, LF, CR, %, \, ',
# ", TAB, ESC, 0x80, ...), then text. Its SHA-256 is hard-coded so a broken
# generator cannot go unnoticed (computed independently with Python's
# hashlib when this file was written).
NV_PATTERN_HEX=00ff0a0d255c272209202a3f5b7e807f1b007674706d64207363656e6172696f204e56207061747465726e204020307831353030303136202836342042292e0a
NV_PATTERN_SHA256=8d215ad78d08e4b18eafa9eeaaf168197fee5b720bcb3acf951eee1d284e1854

# PCR 16 is extended with SHA-256("vtpmd scenario: PCR 16 measurement").
# The expected value is computed at run time as SHA-256(old || digest); when
# old is all zeros (fresh TPM) it must also equal PCR_FROM_ZERO, computed
# independently (Python hashlib) when this file was written.
PCR_MEASUREMENT='vtpmd scenario: PCR 16 measurement'
PCR_DIGEST=7ec160681a222fb574ec3c0d6d99df4f382e20fb05ace584823e8daed4fd1825
PCR_FROM_ZERO=4a9e610094d10c2a95f09fce014cd5b7f8eab94dfbb7c5df1087fa212d1e7c6b
ZERO32=0000000000000000000000000000000000000000000000000000000000000000

# Attributes of the child signing key and the attestation key.
SIGN_ATTRS='fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign'
AK_ATTRS='fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign'

usage() {
    echo "usage: $0 first|second WORKDIR | $0 --list first|second" >&2
    exit 2
}

# registry_names MODE: the check names of MODE, in order.
registry_names() {
    echo "$REGISTRY" | while read -r _m _n _d; do
        [ "$_m" = "$1" ] && echo "$_n"
    done
}

if [ "$1" = "--list" ]; then
    case "$2" in first | second) registry_names "$2"; exit 0 ;; *) usage ;; esac
fi
MODE=$1
W=$2
case "$MODE" in first | second) ;; *) usage ;; esac
[ -n "$W" ] || usage
mkdir -p "$W" || exit 2
W=$(cd "$W" && pwd) || exit 2
cd "$W" || exit 2

CMD_TIMEOUT=${SCENARIO_TIMEOUT:-120}
case "${SCENARIO_FLUSH:-auto}" in
    always) AUTOFLUSH=yes ;;
    never) AUTOFLUSH=no ;;
    *) case "${TPM2TOOLS_TCTI:-}" in
           *tpmrm* | *abrmd*) AUTOFLUSH=no ;;
           *) AUTOFLUSH=yes ;;
       esac ;;
esac
HAVE_TIMEOUT=no
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=yes
# Without a resource manager, the TPM's handles are all ours to inspect.
NO_RM=$AUTOFLUSH

# ---------------------------------------------------------------------------
# Helpers (no bash-isms, no external tools beyond busybox).

# hex2bin HEX: the bytes HEX spells, through printf octal escapes.
hex2bin() {
    _h=$1 _f=
    while [ -n "$_h" ]; do
        _b=${_h%"${_h#??}"}
        _h=${_h#??}
        _d=$((0x$_b))
        _f="$_f\\$((_d / 64))$((_d / 8 % 8))$((_d % 8))"
    done
    # shellcheck disable=SC2059 # the format is the data: octal escapes only
    printf "$_f"
}
hex_of() { od -An -tx1 -v "$1" | tr -d ' \n'; }
sha256_of() { sha256sum < "$1" | cut -c1-64; }
size_of() { wc -c < "$1" | tr -d ' '; }
one_line() { tr '\t\r\n' '   ' | tr -s ' ' | sed 's/^ //; s/ $//' | cut -c1-"${1:-160}"; }

# helpers_ok: known answers for the byte helpers the checks rely on.
helpers_ok() {
    hex2bin 616263 > "$W/.kat" &&
        [ "$(sha256_of "$W/.kat")" = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad ] &&
        hex2bin 00ff0a0d5c25 > "$W/.kat" &&
        [ "$(hex_of "$W/.kat")" = 00ff0a0d5c25 ] && [ "$(size_of "$W/.kat")" = 6 ]
}

# why TEXT: the reason the running check fails (the last one wins).
why() { printf '%s\n' "$*" | one_line > "$W/.reason"; }
# info KEY VALUE: a VTPM-INFO line, printed after the check's result.
info() { echo "VTPM-INFO $1 $2" >> "$W/.info"; }

# err_summary STEP RC: the most telling line of STEP's stderr.
err_summary() {
    if [ "$HAVE_TIMEOUT" = yes ] && { [ "$2" = 124 ] || [ "$2" = 143 ] || [ "$2" = 137 ]; }; then
        echo "timed out after ${CMD_TIMEOUT}s"
        return
    fi
    _l=$(grep -m1 '^ERROR: ' "$W/$1.err" 2>/dev/null)
    [ -n "$_l" ] || _l=$(grep -m1 'ERROR' "$W/$1.err" 2>/dev/null)
    [ -n "$_l" ] || _l=$(grep -v '^[[:space:]]*$' "$W/$1.err" 2>/dev/null | tail -n 1)
    [ -n "$_l" ] || _l="exit status $2"
    printf '%s\n' "$_l" | sed 's/^ERROR: //' | one_line 140
}

# is_retry FILE: the TPM asked to resubmit (TPM_RC_RETRY 0x922, YIELDED
# 0x908, TESTING 0x90a, NV_RATE 0x920) even after ESAPI's own retries.
is_retry() { grep -qiE '\(0x0*9(22|08|0a|20)\)' "$1" 2>/dev/null; }

# tpm STEP CMD...: runs one tpm2 command; stdout to STEP.out, stderr to
# STEP.err. Resubmits up to 3 more times on a retry code, then flushes
# transient objects if there is no resource manager. On failure sets the
# check's reason to "STEP: <error>". Returns the command's status.
tpm() {
    _step=$1
    shift
    echo "$*" > "$W/$_step.cmd"
    _try=1
    while :; do
        if [ "$HAVE_TIMEOUT" = yes ]; then
            timeout "$CMD_TIMEOUT" "$@" > "$W/$_step.out" 2> "$W/$_step.err"
        else
            "$@" > "$W/$_step.out" 2> "$W/$_step.err"
        fi
        _rc=$?
        [ "$_rc" = 0 ] && break
        if [ "$_try" -lt 4 ] && is_retry "$W/$_step.err"; then
            cp "$W/$_step.err" "$W/$_step.err.$_try"
            echo "$_step attempt $_try: $(err_summary "$_step" "$_rc")" >> "$W/retries.log"
            _try=$((_try + 1))
            sleep 1
            continue
        fi
        break
    done
    [ "$AUTOFLUSH" = yes ] && tpm2_flushcontext -t > /dev/null 2>&1
    [ "$_rc" = 0 ] || why "$_step: $(err_summary "$_step" "$_rc")"
    return "$_rc"
}

# flush_between: between checks, without a resource manager, nothing
# transient and no loaded session may be left behind (libtpms has 3 object
# slots and 3 loaded-session slots).
flush_between() {
    if [ "$AUTOFLUSH" = yes ]; then
        tpm2_flushcontext -t > /dev/null 2>&1
        tpm2_flushcontext -l > /dev/null 2>&1
    fi
}

# expect_fail STEP CODE_REGEX WHAT CMD...: CMD must fail, with stderr
# matching CODE_REGEX (so that an unrelated error does not count).
expect_fail() {
    _ef_step=$1 _ef_re=$2 _ef_what=$3
    shift 3
    if tpm "$_ef_step" "$@"; then
        why "$_ef_what was accepted"
        return 1
    fi
    if ! grep -qiE "$_ef_re" "$W/$_ef_step.err"; then
        why "$_ef_what failed for another reason: $(err_summary "$_ef_step" 1)"
        return 1
    fi
    return 0
}

# pcr_value FILE: PCR 16 (sha256) into FILE, 32 bytes.
pcr_value() {
    tpm "$2" tpm2_pcrread "sha256:$PCR" -o "$1" || return 1
    [ "$(size_of "$1")" = 32 ] || { why "$2: PCR value has $(size_of "$1") bytes, not 32"; return 1; }
}

# Fixed inputs.
write_inputs() {
    hex2bin "$NV_PATTERN_HEX" > nv-pattern.bin
    { tail -c 32 nv-pattern.bin; head -c 32 nv-pattern.bin; } > nv-pattern-alt.bin
    printf 'a message signed by the vTPM (%s)\n' "$MODE" > msg.txt
    printf 'a message signed by the vTPM (%s)!\n' "$MODE" > msg-bad.txt
}
nv_pattern_ok() {
    [ "$(sha256_of nv-pattern.bin)" = "$NV_PATTERN_SHA256" ] && [ "$(size_of nv-pattern.bin)" = "$NV_SIZE" ]
}

# ---------------------------------------------------------------------------
# Checks. Each runs in a subshell in $W; return 0 = PASS. On failure the
# reason is what tpm/why recorded last.

t_getrandom() {
    tpm getrandom tpm2_getrandom -o rand.bin 32 || return 1
    [ "$(size_of rand.bin)" = 32 ] || { why "got $(size_of rand.bin) bytes, not 32"; return 1; }
    tpm getrandom-2 tpm2_getrandom -o rand2.bin 32 || return 1
    if cmp -s rand.bin rand2.bin; then why "two calls returned the same 32 bytes"; return 1; fi
    [ "$(hex_of rand.bin)" != "$ZERO32" ] || { why "32 zero bytes"; return 1; }
}

t_pcr_extend_read() {
    helpers_ok || { why "shell byte helpers fail their known answers"; return 1; }
    _digest=$(printf '%s' "$PCR_MEASUREMENT" | sha256sum | cut -c1-64)
    [ "$_digest" = "$PCR_DIGEST" ] || { why "sha256sum gives $_digest for the measurement"; return 1; }
    pcr_value pcr-before.bin pcrread-before || return 1
    tpm pcrextend tpm2_pcrextend "$PCR:sha256=$_digest" || return 1
    pcr_value pcr-after.bin pcrread-after || return 1
    { cat pcr-before.bin; hex2bin "$_digest"; } > pcr-extend-input.bin
    _want=$(sha256_of pcr-extend-input.bin)
    if [ "$(hex_of pcr-before.bin)" = "$ZERO32" ] && [ "$_want" != "$PCR_FROM_ZERO" ]; then
        why "computed expectation $_want differs from the precomputed $PCR_FROM_ZERO"
        return 1
    fi
    _got=$(hex_of pcr-after.bin)
    [ "$_got" = "$_want" ] || { why "PCR $PCR is $_got, expected $_want"; return 1; }
    info pcr16-after-extend "$_got"
}

t_createprimary_rsa() {
    tpm createprimary-rsa tpm2_createprimary -C o -G rsa2048 -c prim-rsa.ctx || return 1
    grep -q '^bits: 2048' createprimary-rsa.out || { why "no 'bits: 2048' in tpm2_createprimary's output"; return 1; }
    grep -q '^rsa: [0-9a-f]\{512\}$' createprimary-rsa.out || { why "no 2048-bit modulus in tpm2_createprimary's output"; return 1; }
}

t_createprimary_ecc() {
    tpm createprimary-ecc tpm2_createprimary -C o -G ecc256 -c prim-ecc.ctx || return 1
    grep -q 'NIST p256' createprimary-ecc.out || { why "curve is not NIST p256"; return 1; }
    # Primary keys derive from the owner seed: the same template gives the
    # same key.
    tpm createprimary-ecc-again tpm2_createprimary -C o -G ecc256 -c prim-ecc-again.ctx || return 1
    grep -E '^(x|y): ' createprimary-ecc.out > prim-ecc.point
    grep -E '^(x|y): ' createprimary-ecc-again.out > prim-ecc-again.point
    [ "$(wc -l < prim-ecc.point)" -eq 2 ] || { why "no x/y point in tpm2_createprimary's output"; return 1; }
    cmp -s prim-ecc.point prim-ecc-again.point || { why "the same primary template gave two different keys"; return 1; }
}

t_create_load() {
    tpm create tpm2_create -C prim-rsa.ctx -G ecc256:ecdsa-sha256 -a "$SIGN_ATTRS" -u key.pub -r key.priv || return 1
    tpm load tpm2_load -C prim-rsa.ctx -u key.pub -r key.priv -c key.ctx || return 1
    tpm load-readpublic tpm2_readpublic -c key.ctx -o key-loaded.pub || return 1
    cmp -s key.pub key-loaded.pub || { why "the loaded key's public area differs from tpm2_create's"; return 1; }
}

t_sign_verify() {
    tpm sign tpm2_sign -c key.ctx -g sha256 -o sig.bin msg.txt || return 1
    tpm verify tpm2_verifysignature -c key.ctx -g sha256 -m msg.txt -s sig.bin -t verify.tkt || return 1
    expect_fail verify-modified '0x2db' "a signature over a modified message" \
        tpm2_verifysignature -c key.ctx -g sha256 -m msg-bad.txt -s sig.bin
}

t_nv_define_write_read() {
    nv_pattern_ok || { why "the NV pattern generator is broken (sha256 $(sha256_of nv-pattern.bin))"; return 1; }
    tpm nvdefine tpm2_nvdefine "$NV_INDEX" -C o -s "$NV_SIZE" -a 'ownerread|ownerwrite' || return 1
    tpm nvreadpublic tpm2_nvreadpublic "$NV_INDEX" || return 1
    grep -q "size: $NV_SIZE\$" nvreadpublic.out || { why "tpm2_nvreadpublic does not show size $NV_SIZE"; return 1; }
    tpm nvwrite tpm2_nvwrite "$NV_INDEX" -C o -i nv-pattern.bin || return 1
    tpm nvread tpm2_nvread "$NV_INDEX" -C o -s "$NV_SIZE" -o nv-read.bin || return 1
    cmp -s nv-pattern.bin nv-read.bin || { why "read back $(size_of nv-read.bin) bytes that differ from the pattern written"; return 1; }
    # A partial read: 16 bytes at offset 8.
    tpm nvread-part tpm2_nvread "$NV_INDEX" -C o -s 16 --offset 8 -o nv-part.bin || return 1
    dd if=nv-pattern.bin of=nv-part-want.bin bs=1 skip=8 count=16 2> /dev/null
    cmp -s nv-part-want.bin nv-part.bin || { why "16 bytes at offset 8 differ from the pattern"; return 1; }
    info nv-sha256 "$(sha256_of nv-read.bin)"
}

t_evictcontrol_sign() {
    tpm evictcontrol tpm2_evictcontrol -C o -c key.ctx "$PERSIST" || return 1
    tpm getcap-persistent tpm2_getcap handles-persistent || return 1
    grep -qi "$PERSIST" getcap-persistent.out || { why "$PERSIST not in handles-persistent"; return 1; }
    tpm readpublic-persistent tpm2_readpublic -c "$PERSIST" -o persist.pub || return 1
    cmp -s key.pub persist.pub || { why "the persistent key's public area differs from the evicted key's"; return 1; }
    tpm sign-persistent tpm2_sign -c "$PERSIST" -g sha256 -o psig.bin msg.txt || return 1
    tpm verify-persistent tpm2_verifysignature -c "$PERSIST" -g sha256 -m msg.txt -s psig.bin || return 1
    info persistent-key-sha256 "$(sha256_of persist.pub)"
}

t_quote_checkquote() {
    tpm ak-create tpm2_create -C prim-ecc.ctx -G ecc256:ecdsa-sha256:null -a "$AK_ATTRS" -u ak.pub -r ak.priv || return 1
    tpm ak-load tpm2_load -C prim-ecc.ctx -u ak.pub -r ak.priv -c ak.ctx || return 1
    tpm quote-nonce tpm2_getrandom -o nonce.bin 16 || return 1
    _nonce=$(hex_of nonce.bin)
    [ ${#_nonce} = 32 ] || { why "quote-nonce: ${#_nonce} hex digits"; return 1; }
    tpm quote tpm2_quote -c ak.ctx -l "sha256:$PCR" -q "$_nonce" -g sha256 \
        -m quote.msg -s quote.sig -o quote.pcrs || return 1
    tpm checkquote tpm2_checkquote -u ak.pub -g sha256 -m quote.msg -s quote.sig -f quote.pcrs -q "$_nonce" || return 1
    # The attested PCR digest (the last 32 bytes of TPMS_ATTEST for one
    # PCR) is SHA-256 of PCR 16's current value, and the nonce is inside.
    pcr_value quote-pcr.bin quote-pcrread || return 1
    tail -c 32 quote.msg > quote-digest.bin
    [ "$(hex_of quote-digest.bin)" = "$(sha256_of quote-pcr.bin)" ] ||
        { why "quoted PCR digest $(hex_of quote-digest.bin) is not sha256(PCR $PCR)"; return 1; }
    case "$(hex_of quote.msg)" in
        ff544347*"0010$_nonce"*) ;;
        *) why "quote is not a TPMS_ATTEST holding the nonce"; return 1 ;;
    esac
    # A wrong nonce and a modified quote must be rejected.
    expect_fail checkquote-wrong-nonce 'nonce' "the quote with a wrong nonce" \
        tpm2_checkquote -u ak.pub -g sha256 -m quote.msg -s quote.sig -f quote.pcrs -q 00112233445566778899aabbccddeeff || return 1
    cp quote.msg quote-modified.msg
    _b=$(od -An -tu1 -j 80 -N 1 quote.msg | tr -d ' ')
    hex2bin "$(printf %02x $((_b ^ 1)))" | dd of=quote-modified.msg bs=1 seek=80 count=1 conv=notrunc 2> /dev/null
    cmp -s quote.msg quote-modified.msg && { why "could not modify the quote"; return 1; }
    expect_fail checkquote-modified 'signature' "a modified quote" \
        tpm2_checkquote -u ak.pub -g sha256 -m quote-modified.msg -s quote.sig -f quote.pcrs -q "$_nonce"
}

# A salted (ECDH with the ECC primary) and bound HMAC session; -c turns on
# parameter encryption (response) and decryption (command), AES-128-CFB.
t_session_start() {
    rm -f session.ctx
    tpm session-start tpm2_startauthsession --hmac-session -c prim-ecc.ctx -S session.ctx || return 1
    tpm session-show tpm2_sessionconfig session.ctx || return 1
    _attrs=$(sed -n 's/^Session-Attributes: *//p' session-show.out)
    case "|$_attrs|" in *"|decrypt|"*) ;; *) why "session attributes '$_attrs' lack decrypt"; return 1 ;; esac
    case "|$_attrs|" in *"|encrypt|"*) ;; *) why "session attributes '$_attrs' lack encrypt"; return 1 ;; esac
    case "|$_attrs|" in *"|continuesession|"*) ;; *) why "session attributes '$_attrs' lack continuesession"; return 1 ;; esac
}

# Response parameter encryption: random bytes come back encrypted.
t_session_getrandom() {
    tpm session-getrandom tpm2_getrandom -S session.ctx --hex 16 || return 1
    _r=$(tr -d ' \n' < session-getrandom.out)
    case "$_r" in
        *[!0-9a-f]*) why "output '$_r' is not hex"; return 1 ;;
    esac
    [ ${#_r} = 32 ] || { why "${#_r} hex digits, not 32"; return 1; }
}

# Owner authorization through the HMAC session. Writing a different pattern
# through it (command parameter encrypted) and reading that back without
# the session proves the TPM decrypted it; then the original pattern goes
# back (the second run checks it) and is read through the session
# (response encrypted).
t_session_nv_write_read() {
    tpm session-nvwrite-alt tpm2_nvwrite "$NV_INDEX" -C o -P session:session.ctx -i nv-pattern-alt.bin || return 1
    tpm session-nvread-plain tpm2_nvread "$NV_INDEX" -C o -s "$NV_SIZE" -o nv-alt-read.bin || return 1
    cmp -s nv-pattern-alt.bin nv-alt-read.bin || { why "data written through the session reads back differently"; return 1; }
    tpm session-nvwrite tpm2_nvwrite "$NV_INDEX" -C o -P session:session.ctx -i nv-pattern.bin || return 1
    tpm session-nvread tpm2_nvread "$NV_INDEX" -C o -P session:session.ctx -s "$NV_SIZE" -o nv-session-read.bin || return 1
    cmp -s nv-pattern.bin nv-session-read.bin || { why "data read through the session differs from the pattern"; return 1; }
}

t_session_flush() {
    tpm session-flush tpm2_flushcontext session.ctx || return 1
    mv session.ctx session-flushed.ctx
    if [ "$NO_RM" = yes ]; then
        tpm getcap-loaded-sessions tpm2_getcap handles-loaded-session || return 1
        tpm getcap-saved-sessions tpm2_getcap handles-saved-session || return 1
        if grep -q 0x getcap-loaded-sessions.out getcap-saved-sessions.out; then
            why "sessions left: $(cat getcap-loaded-sessions.out getcap-saved-sessions.out)"
            return 1
        fi
    fi
}

t_nv_kept() {
    nv_pattern_ok || { why "the NV pattern generator is broken (sha256 $(sha256_of nv-pattern.bin))"; return 1; }
    tpm nvreadpublic tpm2_nvreadpublic "$NV_INDEX" || return 1
    grep -q "size: $NV_SIZE\$" nvreadpublic.out || { why "tpm2_nvreadpublic does not show size $NV_SIZE"; return 1; }
    tpm nvread tpm2_nvread "$NV_INDEX" -C o -s "$NV_SIZE" -o nv-read.bin || return 1
    info nv-sha256 "$(sha256_of nv-read.bin)"
    cmp -s nv-pattern.bin nv-read.bin || { why "NV holds $(size_of nv-read.bin) bytes that differ from the pattern"; return 1; }
}

t_persistent_key_present() {
    tpm getcap-persistent tpm2_getcap handles-persistent || return 1
    grep -qi "$PERSIST" getcap-persistent.out || { why "$PERSIST not in handles-persistent"; return 1; }
    tpm readpublic-persistent tpm2_readpublic -c "$PERSIST" -o persist.pub || return 1
    info persistent-key-sha256 "$(sha256_of persist.pub)"
}

# Signs with the persistent key and verifies against its public part alone
# (loaded as an external key into the null hierarchy). This is the first
# use of a DA-protected key after Startup: libtpms 0.9 may answer
# TPM_RC_RETRY once, which ESAPI (and tpm above) resubmits.
t_persistent_key_signs() {
    tpm loadexternal tpm2_loadexternal -C n -u persist.pub -c persist-ext.ctx || return 1
    tpm sign-persistent tpm2_sign -c "$PERSIST" -g sha256 -o psig.bin msg.txt || return 1
    tpm verify-external tpm2_verifysignature -c persist-ext.ctx -g sha256 -m msg.txt -s psig.bin || return 1
    expect_fail verify-external-modified '0x2db' "a signature over a modified message" \
        tpm2_verifysignature -c persist-ext.ctx -g sha256 -m msg-bad.txt -s psig.bin
}

t_pcr_reset() {
    pcr_value pcr.bin pcrread || return 1
    _got=$(hex_of pcr.bin)
    [ "$_got" = "$ZERO32" ] || { why "PCR $PCR is $_got, not all zeros"; return 1; }
}

# ---------------------------------------------------------------------------
# first mode starts from a fresh TPM; when it is rerun on a used one, the
# NV index and persistent handle are removed first (and said so).
remove_leftovers() {
    if tpm2_nvreadpublic "$NV_INDEX" > /dev/null 2>&1; then
        tpm leftover-nvundefine tpm2_nvundefine "$NV_INDEX" -C o
        echo "VTPM-INFO leftover-removed nv-index-$NV_INDEX"
    fi
    if tpm2_readpublic -c "$PERSIST" > /dev/null 2>&1; then
        tpm leftover-evict tpm2_evictcontrol -C o -c "$PERSIST"
        echo "VTPM-INFO leftover-removed persistent-$PERSIST"
    fi
    [ "$AUTOFLUSH" = yes ] && tpm2_flushcontext -t > /dev/null 2>&1
    rm -f "$W/.reason"
}

PASSED=" "
FAILED=" "
# run_check NAME DEPS: runs and reports one check.
run_check() {
    _name=$1 _deps=$2 _dep_failed=
    rm -f "$W/.reason" "$W/.info"
    if [ "$_deps" != - ]; then
        for _d in $(echo "$_deps" | tr ',' ' '); do
            case "$PASSED" in *" $_d "*) ;; *) _dep_failed=${_dep_failed:+$_dep_failed, }$_d ;; esac
        done
    fi
    if [ -n "$_dep_failed" ]; then
        echo "VTPM-TEST $_name FAIL depends on $_dep_failed"
        FAILED="$FAILED$_name "
        return
    fi
    _fn=t_$(echo "$_name" | tr '-' '_')
    (cd "$W" && "$_fn") < /dev/null > "$W/check-$_name.log" 2>&1
    _rc=$?
    if [ "$_rc" = 0 ]; then
        echo "VTPM-TEST $_name PASS"
        PASSED="$PASSED$_name "
    else
        _why=$(cat "$W/.reason" 2>/dev/null)
        echo "VTPM-TEST $_name FAIL ${_why:-failed (status $_rc), see $W/check-$_name.log}"
        FAILED="$FAILED$_name "
    fi
    [ -f "$W/.info" ] && cat "$W/.info"
    flush_between
}

rm -f "$W/retries.log"
write_inputs
[ -n "${TPM2TOOLS_TCTI:-}" ] || echo "tpm2-scenario: TPM2TOOLS_TCTI is not set; the tools pick their default TCTI" >&2
flush_between
[ "$MODE" = first ] && remove_leftovers

# "name:deps" words of MODE; a for loop keeps stdin away from the checks.
_entries=$(echo "$REGISTRY" | while read -r _m _n _d; do
    [ "$_m" = "$MODE" ] && echo "$_n:$_d"
done)
for _e in $_entries; do
    run_check "${_e%%:*}" "${_e#*:}"
done

# A session that session-flush did not get to (it failed or was skipped).
[ -f "$W/session.ctx" ] && tpm2_flushcontext "$W/session.ctx" > /dev/null 2>&1
flush_between

if [ -s "$W/retries.log" ]; then
    echo "VTPM-INFO scenario-retries $(wc -l < "$W/retries.log" | tr -d ' ')"
fi
[ "$FAILED" = " " ]
