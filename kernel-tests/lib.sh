# kernel-tests/lib.sh: shared by the kernel-test scripts (sourced, bash).
#
# Environment:
#   TPM_BACKEND_BIN  the vTPM backend, called exactly like `swtpm socket`
#                    (default: swtpm; `make kernel-tests` passes vtpmd)
#   KT_BACKEND_ARGS  extra backend arguments, split on spaces (default: none)
#   KT_BUILD         build directory (default: build/kernel-tests)
#   KT_TIMEOUT       seconds one guest boot may take (default: 300)
#   QEMU             QEMU binary (default: qemu-system-x86_64)
#   QEMU_L           its data directories (firmware, ROMs, keymaps), space
#                    separated, each passed as -L (default: none, QEMU's own);
#                    QEMU_MODULE_DIR, if set, reaches QEMU as it is
#   KT_VIRTIO_ID     virtio device id of the vhost-user-tpm device (default 45)

KT_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KT_ROOT=$(cd "$KT_HERE/.." && pwd)
KT_BUILD=${KT_BUILD:-$KT_ROOT/build/kernel-tests}
TPM_BACKEND_BIN=${TPM_BACKEND_BIN:-swtpm}
KT_BACKEND_ARGS=${KT_BACKEND_ARGS:-}
KT_TIMEOUT=${KT_TIMEOUT:-300}
QEMU=${QEMU:-qemu-system-x86_64}
QEMU_L=${QEMU_L:-}
KT_VIRTIO_ID=${KT_VIRTIO_ID:-45}

die() { echo "$*" >&2; exit 1; }

# device_name DEV: "crb" or "tpm-crb" -> "tpm-crb" (likewise tis).
device_name() {
  case "$1" in
    crb | tpm-crb) echo tpm-crb ;;
    tis | tpm-tis) echo tpm-tis ;;
    vhost-user | vhost-user-tpm) echo vhost-user-tpm ;;   # `vtpmd vhost-user`, QEMU >= 10.2
    *) echo "unknown TPM device '$1' (use tpm-crb, tpm-tis or vhost-user-tpm)" >&2; return 1 ;;
  esac
}

# tpm_args DEVICE SOCK: QEMU's TPM arguments, one per line, read from
# qemu-configs/DEVICE.args with @SOCK@ replaced.
tpm_args() {
  local file="$KT_ROOT/qemu-configs/$1.args"
  [ -f "$file" ] || { echo "missing QEMU config $file" >&2; return 1; }
  grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$file" | sed -e "s|@SOCK@|$2|g" -e "s|@VIRTIO_ID@|$KT_VIRTIO_ID|g"
}

# qemu_command DEVICE SOCK MODE: sets the array QEMU_CMD to the command line
# of one test guest (kernel parameter vtpm.mode=MODE).
qemu_command() {
  local dev=$1 sock=$2 mode=$3 tpm extra= d
  tpm=$(tpm_args "$dev" "$sock") || return 1
  # The virtio-tpm guest loads our driver for the device's id.
  [ "$dev" = vhost-user-tpm ] && extra=" vtpm.virtio_id=$KT_VIRTIO_ID vtpm.timeout_ms=${KT_VIRTIO_TIMEOUT_MS:-30000}"
  QEMU_CMD=("$QEMU")
  for d in $QEMU_L; do QEMU_CMD+=(-L "$d"); done
  QEMU_CMD+=(-accel tcg -m 512 -smp 1 -nographic -no-reboot -nic none
    -kernel "$KT_BUILD/vmlinuz" -initrd "$KT_BUILD/initramfs.cpio.gz"
    -append "console=ttyS0 panic=-1 quiet loglevel=3 vtpm.mode=$mode$extra")
  mapfile -t -O "${#QEMU_CMD[@]}" QEMU_CMD <<<"$tpm"
}

# start_backend STATEDIR SOCK LOG PIDFILE [DEVICE]: starts the backend in the
# background on STATEDIR with its control socket at SOCK and waits (bounded)
# for the socket; QEMU's emulator backend needs it listening before start.
# DEVICE vhost-user-tpm starts `vtpmd vhost-user` with its vhost-user socket
# at SOCK instead. Sets BACKEND_PID and BACKEND_KIND (socket or vhost-user).
# The backend's stdout/stderr go to LOG.stderr.
start_backend() {
  local state=$1 sock=$2 log=$3 pidfile=$4 dev=${5:-} _
  command -v "$TPM_BACKEND_BIN" >/dev/null || { echo "backend '$TPM_BACKEND_BIN' not found (set TPM_BACKEND_BIN)" >&2; return 1; }
  mkdir -p "$state"
  rm -f "$sock" "$pidfile"
  if [ "$dev" = vhost-user-tpm ]; then
    BACKEND_KIND=vhost-user
    # shellcheck disable=SC2086 # KT_BACKEND_ARGS is split on purpose
    "$TPM_BACKEND_BIN" vhost-user --socket-path "$sock" --virtio-id "$KT_VIRTIO_ID" \
      --tpmstate "dir=$state" --log "file=$log,level=20" \
      --pid "file=$pidfile" $KT_BACKEND_ARGS >"$log.stderr" 2>&1 &
  else
    BACKEND_KIND=socket
    # shellcheck disable=SC2086 # KT_BACKEND_ARGS is split on purpose
    "$TPM_BACKEND_BIN" socket --tpm2 --tpmstate "dir=$state" \
      --ctrl "type=unixio,path=$sock" --log "file=$log,level=20" \
      --pid "file=$pidfile" $KT_BACKEND_ARGS >"$log.stderr" 2>&1 &
  fi
  BACKEND_PID=$!
  for _ in $(seq 1 100); do
    [ -S "$sock" ] && break
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
      echo "backend $TPM_BACKEND_BIN exited at start-up; its output:" >&2
      tail -n 20 "$log.stderr" "$log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.1
  done
  if [ ! -S "$sock" ]; then
    echo "backend's control socket $sock did not appear within 10 s; killing it" >&2
    kill "$BACKEND_PID" 2>/dev/null
    return 1
  fi
  if [ "$(cat "$pidfile" 2>/dev/null)" != "$BACKEND_PID" ]; then
    echo "warning: pid file $pidfile does not hold the backend's pid $BACKEND_PID" >&2
  fi
}

# stop_backend: the backend exits by itself on QEMU's CMD_SHUTDOWN; give it
# 5 s, then kill it and say so. Sets BACKEND_END to "exited" or "killed".
# A vhost-user backend waits for the next frontend instead: it gets SIGTERM
# and must exit with status 0 within 5 s ("terminated").
# shellcheck disable=SC2034 # BACKEND_END is read by the caller
stop_backend() {
  local _ rc
  if [ "${BACKEND_KIND:-socket}" = vhost-user ]; then
    kill -TERM "$BACKEND_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
      if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
        rc=0; wait "$BACKEND_PID" 2>/dev/null || rc=$?
        if [ "$rc" -eq 0 ]; then BACKEND_END=terminated; else BACKEND_END="exited-$rc"; fi
        return 0
      fi
      sleep 0.1
    done
  fi
  for _ in $(seq 1 50); do
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
      wait "$BACKEND_PID" 2>/dev/null || true
      BACKEND_END=exited
      return 0
    fi
    sleep 0.1
  done
  echo "backend (pid $BACKEND_PID) still running 5 s after QEMU quit; killing it" >&2
  kill "$BACKEND_PID" 2>/dev/null || true
  sleep 1
  kill -9 "$BACKEND_PID" 2>/dev/null || true
  wait "$BACKEND_PID" 2>/dev/null || true
  BACKEND_END=killed
}

# part TAG NAME COMMAND...: one part of a larger run (run-qemu10-tests.sh,
# run-qemu11-tests.sh), counted in PARTS and PARTS_FAILED; parts_summary TAG
# prints "TAG: N of M parts failed" and fails if any did.
PARTS=0 PARTS_FAILED=0
part() {
  local tag=$1 name=$2; shift 2
  PARTS=$((PARTS + 1))
  echo "== $tag: $name"
  if ! "$@"; then PARTS_FAILED=$((PARTS_FAILED + 1)); echo "$tag: $name FAILED"; fi
}
parts_summary() {
  echo "$1: $PARTS_FAILED of $PARTS parts failed"
  [ "$PARTS_FAILED" -eq 0 ]
}

# prepare_guest: kernel and initramfs, both cached.
prepare_guest() {
  bash "$KT_HERE/fetch-kernel.sh"
  bash "$KT_HERE/build-initramfs.sh"
}
