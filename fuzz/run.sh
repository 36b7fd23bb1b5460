#!/usr/bin/env bash
# Runs every fuzz target (or those named) with libFuzzer for FUZZ_SECONDS
# each, one after another (one fuzzer process at a time). New inputs go to
# build/fuzz/work/<target>; after each run the kept corpus
# fuzz/corpus/<target> is replaced by a minimised one (libFuzzer -merge=1
# over the old corpus and the new inputs; the hand-written seed-* files
# stay). A crash or a hang (-timeout) stops the script non-zero and leaves
# the input in build/fuzz/artifacts/<target>/: fix it, then copy the input
# into fuzz/regressions/<target>/ so `make test` replays it.
#
# Uses cargo-fuzz on the stable toolchain with RUSTC_BOOTSTRAP=1 (the
# sanitizer flags are nightly-only); see docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-600}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
export RUSTC_BOOTSTRAP=1
FLAGS=(--fuzz-dir fuzz/libfuzzer -O -a)

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/libfuzzer/Cargo.toml | grep -v '^vtpm-fuzz')
fi

cargo fuzz build "${FLAGS[@]}"
bin=fuzz/libfuzzer/target/x86_64-unknown-linux-gnu/release
mkdir -p build/fuzz
summary=build/fuzz/summary.txt
for t in "${targets[@]}"; do
  work=build/fuzz/work/$t
  art=build/fuzz/artifacts/$t
  mkdir -p "$work" "$art" "fuzz/corpus/$t" "fuzz/regressions/$t"
  log=build/fuzz/$t.log
  echo "fuzz: $t for ${FUZZ_SECONDS}s (log $log)"
  set +e
  "$bin/$t" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" \
    -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=2048 \
    -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
  echo "$t rc=$rc runs=${runs:-?} ${done_line}" | tee -a "$summary"
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log"
    echo "fuzz: $t FAILED; inputs in $art/" >&2
    exit 1
  fi
  # Keep a minimised corpus: the smallest set with the same coverage.
  fresh=build/fuzz/min/$t
  rm -rf "$fresh" && mkdir -p "$fresh"
  "$bin/$t" -merge=1 "$fresh" "fuzz/corpus/$t" "$work" >"build/fuzz/$t.merge.log" 2>&1
  find "fuzz/corpus/$t" -type f ! -name 'seed-*' -delete
  cp "$fresh"/* "fuzz/corpus/$t/"
  echo "fuzz: $t corpus now $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
done
