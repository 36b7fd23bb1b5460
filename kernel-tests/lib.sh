# Shared by the kernel-test scripts (sourced).
KT_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KT_ROOT=$(cd "$KT_HERE/.." && pwd)
KT_BUILD=${KT_BUILD:-$KT_ROOT/build/kernel-tests}
TPM_BACKEND_BIN=${TPM_BACKEND_BIN:-$KT_ROOT/target/release/vtpmd}
QEMU=${QEMU:-qemu-system-x86_64}
KT_TIMEOUT=${KT_TIMEOUT:-600}

# tpm_args DEVICE SOCK: the QEMU TPM arguments from qemu-configs/.
tpm_args() {
  local file="$KT_ROOT/qemu-configs/tpm-$1.args"
  [ -f "$file" ] || { echo "no QEMU config $file" >&2; return 1; }
  grep -v '^#' "$file" | grep -v '^$' | sed "s|@SOCK@|$2|"
}

# start_backend STATEDIR SOCK LOG [extra args...]: starts the backend in the
# background, waits for its control socket; sets BACKEND_PID.
start_backend() {
  local state=$1 sock=$2 log=$3
  shift 3
  mkdir -p "$state"
  rm -f "$sock"
  "$TPM_BACKEND_BIN" socket --tpm2 --tpmstate "dir=$state" \
    --ctrl "type=unixio,path=$sock" --log "file=$log,level=20" "$@" &
  BACKEND_PID=$!
  local i
  for i in $(seq 1 500); do
    [ -S "$sock" ] && return 0
    kill -0 "$BACKEND_PID" 2>/dev/null || { echo "backend exited at start-up; log:" >&2; tail -n 20 "$log" >&2; return 1; }
    sleep 0.01
  done
  echo "backend's control socket $sock did not appear" >&2
  return 1
}

# stop_backend: waits for the backend to exit after QEMU's SHUTDOWN, kills
# it if it does not.
stop_backend() {
  local i
  for i in $(seq 1 300); do
    kill -0 "$BACKEND_PID" 2>/dev/null || { wait "$BACKEND_PID" 2>/dev/null; return 0; }
    sleep 0.01
  done
  echo "backend $BACKEND_PID still running 3 s after QEMU quit; killing it" >&2
  kill "$BACKEND_PID" 2>/dev/null
  wait "$BACKEND_PID" 2>/dev/null
  return 0
}

# qemu_cmd DEVICE SOCK MODE: the QEMU command line for a test guest.
qemu_cmd() {
  local dev=$1 sock=$2 mode=$3
  echo "$QEMU" -accel tcg -m 512 -smp 1 -nographic -no-reboot \
    -kernel "$KT_BUILD/vmlinuz" -initrd "$KT_BUILD/initramfs.cpio.gz" \
    -append "'console=ttyS0 panic=-1 quiet loglevel=3 vtpm.mode=$mode'" \
    $(tpm_args "$dev" "$sock")
}

prepare_guest() {
  bash "$KT_HERE/fetch-kernel.sh"
  bash "$KT_HERE/build-initramfs.sh"
}
