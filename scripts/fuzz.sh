#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each one in turn (libFuzzer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   fuzz (default 10 s each, every target)
#   scripts/fuzz.sh --merge [TARGET...]                minimize fuzz/corpus/<target> together
#                                                      with what runs found, into fuzz/corpus/<target>
#                                                      (regression-* seeds are always kept)
#
# Builds with the stable toolchain: plain cargo with the SanitizerCoverage
# flags libFuzzer needs (no sanitizer, no nightly, no cargo-fuzz). Panics,
# failed assertions and arithmetic overflow are crashes.
#
# Each run starts from the committed seeds (fuzz/corpus/<target>, read only)
# and keeps what it finds in fuzz/target/corpus/<target> for the next run;
# fuzz/dict/<target>.dict, where present, gives libFuzzer the format's tokens.
# A crashing input is saved as fuzz/artifacts/<target>/crash-*; rerun it with
#   fuzz/target/<host>/release/<target> fuzz/artifacts/<target>/crash-...
# Exits non-zero when any target crashed (the others still run).
# FUZZ_ARGS adds libFuzzer options, e.g. FUZZ_ARGS="-seed=1 -max_len=16384".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

TARGETS=(config retry_after sse body paths shared_data host_maps rls)
MERGE=0
if [ "${1:-}" = "--merge" ]; then
  MERGE=1
  shift
fi
SECONDS_PER_TARGET=10
if (( ! MERGE )) && [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  SECONDS_PER_TARGET="$1"
  shift
fi
if (( $# )); then
  for t in "$@"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "fuzz: unknown target $t (targets: ${TARGETS[*]})" >&2; exit 2; }
  done
  TARGETS=("$@")
fi

HOST="$(rustc -vV | sed -n 's/^host: //p')"
BIN="fuzz/target/$HOST/release"
# What cargo-fuzz passes with `-s none`. `--target` keeps these flags off
# build scripts and proc macros (serde_derive), which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth --cfg fuzzing"
echo "fuzz: building ${TARGETS[*]} ($(rustc --version))"
cargo build --quiet --release --manifest-path fuzz/Cargo.toml --target "$HOST" --target-dir fuzz/target \
  $(printf -- '--bin %s ' "${TARGETS[@]}")

if (( MERGE )); then
  for t in "${TARGETS[@]}"; do
    seeds="fuzz/corpus/$t" found="fuzz/target/corpus/$t" merged="fuzz/target/merged/$t"
    mkdir -p "$seeds" "$found"
    rm -rf "$merged" && mkdir -p "$merged"
    # Minimized by edges alone (no hit counts or comparison features): a small
    # seed set that still reaches every edge the runs reached.
    # Inputs that crash are left out (and written under fuzz/artifacts/<target>/merge-).
    mkdir -p "fuzz/artifacts/$t"
    "$BIN/$t" -merge=1 -use_counters=0 -use_cmp=0 -artifact_prefix="fuzz/artifacts/$t/merge-" \
      "$merged" "$seeds" "$found" >"fuzz/target/merge-$t.log" 2>&1 \
      || { echo "fuzz: merging $t failed, see fuzz/target/merge-$t.log" >&2; exit 1; }
    # Inputs that once crashed stay, under their names (and only once).
    for r in "$seeds"/regression-*; do
      [ -f "$r" ] || continue
      rm -f "$merged/$(sha1sum "$r" | cut -d' ' -f1)"
      cp "$r" "$merged/"
    done
    rm -rf "$seeds" && mv "$merged" "$seeds"
    echo "fuzz: $t corpus: $(find "$seeds" -type f | wc -l) files, $(du -sk --apparent-size "$seeds" | cut -f1) KiB"
  done
  exit 0
fi

mkdir -p fuzz/target/logs
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  seeds="fuzz/corpus/$t" found="fuzz/target/corpus/$t" artifacts="fuzz/artifacts/$t/" log="fuzz/target/logs/$t.log"
  mkdir -p "$seeds" "$found" "$artifacts"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s"
  dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
  rc=0
  # shellcheck disable=SC2086
  "$BIN/$t" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="$artifacts" ${FUZZ_ARGS:-} "$found" "$seeds" >"$log" 2>&1 || rc=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: //p' "$log" | tail -1)"
  [ -n "$execs" ] || execs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)"
  cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)"
  files="$(find "$found" -type f | wc -l)"
  if (( rc == 0 )); then
    result=ok
  else
    result="CRASH (exit $rc)"
    failed+=("$t")
    grep -E -m1 -A12 "panicked at|ERROR: libFuzzer|==[0-9]+== ERROR" "$log" || tail -30 "$log"
    grep -o "Test unit written to .*" "$log" || true
  fi
  summary+=("$(printf '%-12s %6ss %12s execs  %-22s corpus %5s  %s' "$t" "$SECONDS_PER_TARGET" "${execs:-?}" "${cov:-cov: ?}" "$files" "$result")")
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
if (( ${#failed[@]} )); then
  echo "fuzz: crashed: ${failed[*]} (inputs under fuzz/artifacts/, logs under fuzz/target/logs/)" >&2
  exit 1
fi
