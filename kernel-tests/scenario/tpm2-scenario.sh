#!/bin/sh
# The TPM scenario: tpm2-tools against whatever TPM2TOOLS_TCTI points at.
# Runs under busybox sh (inside the test guest) and on the host alike.
#
#   tpm2-scenario.sh MODE WORKDIR    run the checks of MODE (first|second)
#   tpm2-scenario.sh --list MODE     print the names of MODE's checks
#
# Output: one line per check, "VTPM-TEST <name> PASS" or
# "VTPM-TEST <name> FAIL <reason>", and "VTPM-INFO <key> <value>" lines the
# host compares between runs. A failed check never stops the script.

NV_INDEX=0x1500016
PERSIST=0x81000101
PCR=16

checks_first="getrandom pcr-extend-read createprimary-rsa createprimary-ecc create-load sign-verify nv-define-write-read evictcontrol-sign quote-checkquote hmac-session-encrypted"
checks_second="getrandom nv-kept persistent-key-present persistent-key-signs pcr-reset"

if [ "$1" = "--list" ]; then
    case "$2" in
        first) list=$checks_first ;;
        second) list=$checks_second ;;
        *) echo "unknown mode $2" >&2; exit 2 ;;
    esac
    for c in $list; do echo "$c"; done
    exit 0
fi

MODE=$1
W=${2:-/tmp/vtpm-scenario}
case "$MODE" in first|second) ;; *) echo "usage: $0 first|second WORKDIR | --list MODE" >&2; exit 2 ;; esac
mkdir -p "$W" || exit 2
cd "$W" || exit 2

failed=""
pass() { echo "VTPM-TEST $1 PASS"; }
fail() { echo "VTPM-TEST $1 FAIL $2"; failed="$failed $1"; }
# run NAME CMD...: runs a tpm2 command, keeping its stderr for the reason.
run() { name=$1; shift; "$@" >"$W/$name.out" 2>"$W/$name.err"; }
reason() { tail -n 1 "$W/$1.err" 2>/dev/null | tr -s ' \t' ' ' | cut -c1-120; }
depends() { for d in "$@"; do case " $failed " in *" $d "*) return 0 ;; esac; done; return 1; }
flush() { tpm2_flushcontext -t >/dev/null 2>&1; tpm2_flushcontext -s >/dev/null 2>&1; }

# The 64-byte NV pattern.
nv_pattern() { printf 'vtpmd-nv-pattern:0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJK'; }

# hex2bin HEX: raw bytes.
hex2bin() { printf "$(echo "$1" | sed 's/../\\x&/g')"; }

size_of() { wc -c < "$1" | tr -d ' '; }

if [ "$MODE" = first ]; then
    # getrandom
    if run getrandom tpm2_getrandom -o rand.bin 32 && [ "$(size_of rand.bin)" = 32 ]; then
        pass getrandom
    else fail getrandom "$(reason getrandom)"; fi

    # pcr-extend-read: new = SHA256(old || digest), computed here.
    digest=$(printf 'vtpmd measured this' | sha256sum | cut -d' ' -f1)
    if run pcr-before tpm2_pcrread "sha256:$PCR" -o pcr-before.bin &&
       run pcr-extend tpm2_pcrextend "$PCR:sha256=$digest" &&
       run pcr-after tpm2_pcrread "sha256:$PCR" -o pcr-after.bin; then
        { cat pcr-before.bin; hex2bin "$digest"; } > pcr-concat.bin
        want=$(sha256sum < pcr-concat.bin | cut -d' ' -f1)
        got=$(od -An -tx1 -v pcr-after.bin | tr -d ' \n')
        if [ "$want" = "$got" ] && [ "$(size_of pcr-concat.bin)" = 64 ]; then pass pcr-extend-read
        else fail pcr-extend-read "expected $want got $got"; fi
    else fail pcr-extend-read "$(reason pcr-before; reason pcr-extend; reason pcr-after)"; fi

    if run createprimary-rsa tpm2_createprimary -C o -G rsa2048 -c prim-rsa.ctx; then pass createprimary-rsa
    else fail createprimary-rsa "$(reason createprimary-rsa)"; fi
    flush

    if run createprimary-ecc tpm2_createprimary -C o -G ecc256 -c prim.ctx; then pass createprimary-ecc
    else fail createprimary-ecc "$(reason createprimary-ecc)"; fi
    flush

    if depends createprimary-ecc; then fail create-load "depends on createprimary-ecc"
    elif run create tpm2_create -C prim.ctx -G ecc256 -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u key.pub -r key.priv &&
         flush && run load tpm2_load -C prim.ctx -u key.pub -r key.priv -c key.ctx; then pass create-load
    else fail create-load "$(reason create; reason load)"; fi
    flush

    printf 'a message signed by the vTPM' > msg.txt
    printf 'a message signed by the vTPM!' > msg-bad.txt
    if depends create-load; then fail sign-verify "depends on create-load"
    elif run sign tpm2_sign -c key.ctx -g sha256 -o sig.bin msg.txt && flush &&
         run verify tpm2_verifysignature -c key.ctx -g sha256 -m msg.txt -s sig.bin; then
        flush
        if run verify-bad tpm2_verifysignature -c key.ctx -g sha256 -m msg-bad.txt -s sig.bin; then
            fail sign-verify "a modified message verified"
        else pass sign-verify; fi
    else fail sign-verify "$(reason sign; reason verify)"; fi
    flush

    nv_pattern > nv-pattern.bin
    if run nvdefine tpm2_nvdefine "$NV_INDEX" -C o -s 64 -a 'ownerread|ownerwrite|authread|authwrite' &&
       run nvwrite tpm2_nvwrite "$NV_INDEX" -C o -i nv-pattern.bin &&
       run nvread tpm2_nvread "$NV_INDEX" -C o -s 64 -o nv-read.bin && cmp -s nv-pattern.bin nv-read.bin; then
        pass nv-define-write-read
        echo "VTPM-INFO nv-sha256 $(sha256sum < nv-read.bin | cut -d' ' -f1)"
    else fail nv-define-write-read "$(reason nvdefine; reason nvwrite; reason nvread)"; fi

    if depends create-load; then fail evictcontrol-sign "depends on create-load"
    elif run evict tpm2_evictcontrol -C o -c key.ctx "$PERSIST" && flush &&
         run psign tpm2_sign -c "$PERSIST" -g sha256 -o psig.bin msg.txt &&
         run pverify tpm2_verifysignature -c "$PERSIST" -g sha256 -m msg.txt -s psig.bin &&
         run readpublic tpm2_readpublic -c "$PERSIST" -o persist.pub; then
        pass evictcontrol-sign
        echo "VTPM-INFO persistent-key-sha256 $(sha256sum < persist.pub | cut -d' ' -f1)"
    else fail evictcontrol-sign "$(reason evict; reason psign; reason pverify; reason readpublic)"; fi
    flush

    nonce=$(od -An -tx1 -N 16 rand.bin | tr -d ' \n')
    [ -n "$nonce" ] || nonce=00112233445566778899aabbccddeeff
    if depends createprimary-ecc; then fail quote-checkquote "depends on createprimary-ecc"
    elif run ak-create tpm2_create -C prim.ctx -G ecc256:ecdsa-sha256:null -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign' -u ak.pub -r ak.priv &&
         flush && run ak-load tpm2_load -C prim.ctx -u ak.pub -r ak.priv -c ak.ctx && flush &&
         run quote tpm2_quote -c ak.ctx -l "sha256:$PCR" -q "$nonce" -m quote.msg -s quote.sig -o quote.pcrs -g sha256 && flush &&
         run ak-pem tpm2_readpublic -c ak.ctx -f pem -o ak.pem && flush &&
         run checkquote tpm2_checkquote -u ak.pem -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q "$nonce"; then
        if run checkquote-bad tpm2_checkquote -u ak.pem -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q 00; then
            fail quote-checkquote "a quote verified against the wrong nonce"
        else pass quote-checkquote; fi
    else fail quote-checkquote "$(reason ak-create; reason ak-load; reason quote; reason ak-pem; reason checkquote)"; fi
    flush

    # A salted HMAC session with parameter encryption, used to read NV.
    if depends createprimary-ecc nv-define-write-read; then fail hmac-session-encrypted "depends on createprimary-ecc, nv-define-write-read"
    elif run sess tpm2_startauthsession --hmac-session -c prim.ctx -S session.ctx &&
         run sessconf tpm2_sessionconfig session.ctx --enable-encrypt --enable-decrypt --enable-continuesession &&
         run sessconf-show tpm2_sessionconfig session.ctx &&
         run sess-nvread tpm2_nvread "$NV_INDEX" -C o -s 64 -P session:session.ctx -o nv-enc.bin &&
         grep -q encrypt sessconf-show.out && cmp -s nv-pattern.bin nv-enc.bin; then
        pass hmac-session-encrypted
    else fail hmac-session-encrypted "$(reason sess; reason sessconf; reason sess-nvread)"; fi
    tpm2_flushcontext session.ctx >/dev/null 2>&1
    flush
else
    if run getrandom tpm2_getrandom -o rand.bin 16 && [ "$(size_of rand.bin)" = 16 ]; then pass getrandom
    else fail getrandom "$(reason getrandom)"; fi

    nv_pattern > nv-pattern.bin
    if run nvread tpm2_nvread "$NV_INDEX" -C o -s 64 -o nv-read.bin && cmp -s nv-pattern.bin nv-read.bin; then
        pass nv-kept
        echo "VTPM-INFO nv-sha256 $(sha256sum < nv-read.bin | cut -d' ' -f1)"
    else fail nv-kept "$(reason nvread)"; fi

    if run getcap tpm2_getcap handles-persistent && grep -qi "$PERSIST" getcap.out &&
       run readpublic tpm2_readpublic -c "$PERSIST" -o persist.pub; then
        pass persistent-key-present
        echo "VTPM-INFO persistent-key-sha256 $(sha256sum < persist.pub | cut -d' ' -f1)"
    else fail persistent-key-present "$(reason getcap; reason readpublic)"; fi

    printf 'signed after a restart' > msg2.txt
    if depends persistent-key-present; then fail persistent-key-signs "depends on persistent-key-present"
    elif run psign tpm2_sign -c "$PERSIST" -g sha256 -o psig2.bin msg2.txt &&
         run pverify tpm2_verifysignature -c "$PERSIST" -g sha256 -m msg2.txt -s psig2.bin; then
        pass persistent-key-signs
    else fail persistent-key-signs "$(reason psign; reason pverify)"; fi
    flush

    zeros=0000000000000000000000000000000000000000000000000000000000000000
    if run pcr tpm2_pcrread "sha256:$PCR" -o pcr.bin; then
        got=$(od -An -tx1 -v pcr.bin | tr -d ' \n')
        if [ "$got" = "$zeros" ]; then pass pcr-reset; else fail pcr-reset "PCR $PCR is $got"; fi
    else fail pcr-reset "$(reason pcr)"; fi
fi
exit 0
