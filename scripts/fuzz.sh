#!/usr/bin/env bash
# Runs every fuzz target in fuzz/fuzz_targets/ for a bounded time, then prints how many inputs
# each one executed. Exits non-zero if any target crashed (a panic, a failed check, an
# allocation over the limit, a timeout); its input is saved under fuzz/artifacts/<target>/ and
# the end of its log is printed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      default 60
#   FUZZ_SANITIZER=none scripts/fuzz.sh 60    without AddressSanitizer (see below)
#
# Each target starts from fuzz/corpus/<target>/ (what earlier runs on this machine found; not
# checked in) plus the checked-in fuzz/seeds/<target>/, with the libFuzzer dictionary
# fuzz/dicts/<target>.dict when there is one. Limits: -malloc_limit_mb=256 (one allocation
# larger than that is a crash: a size taken from hostile input), -rss_limit_mb=2048, and 30 s
# per input. The build goes to fuzz/target, never the main target directory. Logs:
# fuzz/target/fuzz-logs/<target>.log.
#
# Toolchain (what was found on the stable-only machine, rustc 1.95, no nightly to fetch):
# - cargo-fuzz itself builds on stable: `cargo install --locked cargo-fuzz --version 0.13.2`
#   (done here when `cargo fuzz` is missing; ~25 s on 2 cores).
# - Its default build passes `-Zsanitizer=address`, which stable rustc refuses; stable rustc
#   does ship the AddressSanitizer runtime (librustc-stable_rt.asan.a), so RUSTC_BOOTSTRAP=1 —
#   which lets stable rustc take nightly-only flags — is all it needs: with it the default
#   build (release, debug assertions and overflow checks on, ASan) builds and runs. No other
#   flag (-O, --debug-assertions, --no-default-features) is needed; --build-std is not used.
# - `--sanitizer none` passes no -Z flag at all and builds on plain stable even without
#   RUSTC_BOOTSTRAP. But libFuzzer counts allocations through the sanitizer's malloc hooks:
#   without a sanitizer -malloc_limit_mb does nothing, and a huge Vec::with_capacity that the
#   kernel overcommits and nobody touches goes unnoticed (-rss_limit_mb only sees touched
#   memory). So ASan stays the default here, although it costs executions (routes: ~3.5x fewer
#   per second than without a sanitizer). FUZZ_SANITIZER=none is for a quick look only.
# - Time on this 2-core machine: the first build of the targets (the whole crate and its
#   dependencies with coverage instrumentation and ASan, in fuzz/target: 2.7 GB) took 7.5 to
#   9 min; a change in src/ recompiles the crate (codegen-units=1) and the targets. Measured on
#   a fresh checkout without cargo-fuzz: `scripts/fuzz.sh 30` took 11.5 min (install 24 s,
#   build 533 s, then 4 targets × 30 s plus a few seconds each).
#
# Replay one crash:  RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]] || [[ $# -gt 1 ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (a whole number of seconds, default 60)" >&2
    exit 2
fi
cargo_fuzz_version=0.13.2
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
root=$PWD
target_dir=$root/fuzz/target
logs=$target_dir/fuzz-logs
started=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $cargo_fuzz_version"
    t=$(date +%s)
    cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
    echo "installed in $(($(date +%s) - t))s"
fi
echo "== $(cargo fuzz --version), $(rustc --version), sanitizer: $sanitizer"

targets=()
for file in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$file" .rs)")
done

# One build of every target first, so that its time shows apart from the fuzzing time
# (`cargo fuzz run` below then finds everything up to date).
build=(--sanitizer "$sanitizer" --target-dir "$target_dir")
echo "== building ${targets[*]}"
t=$(date +%s)
cargo fuzz build "${build[@]}"
echo "built in $(($(date +%s) - t))s"

mkdir -p "$logs"
failed=()
rows=()
for target in "${targets[@]}"; do
    corpora=("fuzz/corpus/$target")
    mkdir -p "${corpora[0]}"
    [[ -d fuzz/seeds/$target ]] && corpora+=("fuzz/seeds/$target")
    options=(-max_total_time="$seconds" -malloc_limit_mb=256 -rss_limit_mb=2048 -timeout=30
        -print_final_stats=1)
    [[ -f fuzz/dicts/$target.dict ]] && options+=(-dict="fuzz/dicts/$target.dict")
    log=$logs/$target.log
    echo "== fuzzing $target for ${seconds}s"
    status=0
    # The outer timeout only guards against a fuzzer that ignores -max_total_time.
    timeout --kill-after=30 $((seconds + 300)) \
        cargo fuzz run "${build[@]}" "$target" "${corpora[@]}" -- "${options[@]}" \
        </dev/null >"$log" 2>&1 || status=$?
    # libFuzzer's last words: "Done N runs in S second(s)" on a clean stop; the final stats
    # (printed on a crash too) otherwise.
    runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -n 1)
    [[ -n $runs ]] || runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    [[ -n $runs ]] || runs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE .*/\1/p' "$log" | tail -n 1)
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    if [[ $status -eq 0 ]]; then
        result=ok
    else
        failed+=("$target")
        result="FAILED (exit $status)"
        reason=$(grep -m 1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|^error" "$log" || true)
        [[ -n $reason ]] && result="$result: ${reason:0:100}"
        echo "---- end of $log"
        # The panic message or sanitizer report and the input, without the stack traces (they
        # are in the log).
        grep -v -E '^ +(#[0-9]+ 0x|at |[0-9]+: )|^stack backtrace:|^Stack backtrace:|^0x[0-9a-f]+,' \
            "$log" | tail -n 40
        echo "---- replay: RUSTC_BOOTSTRAP=1 cargo fuzz run $target fuzz/artifacts/$target/<file>"
    fi
    rate=-
    [[ -n $runs && $status -eq 0 ]] && rate=$((runs / seconds))
    rows+=("$(printf '%-14s %12s %8s %8s  %s' "$target" "${runs:-?}" "$rate" "$corpus" "$result")")
done

echo "== executions in ${seconds}s per target"
printf '%-14s %12s %8s %8s  %s\n' target runs "runs/s" corpus result
printf '%s\n' "${rows[@]}"
echo "== done in $(($(date +%s) - started))s"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzzing found a problem in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
