#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, one after another, one process
# at a time, and prints executions, executions/s and whether it crashed.
#
#   fuzz/run.sh [seconds-per-target] [target...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Works on the stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo fuzz pass its nightly-only
# flags, and --sanitizer none skips AddressSanitizer (safe Rust does not
# need it; panics, overflows and aborts are still caught). Corpora grow in
# fuzz/corpus/<target> (seeded from fuzz/seeds/<target>, with the tokens of
# fuzz/dicts/<target>.dict where there is one), crashes land in
# fuzz/artifacts/<target>; both are git-ignored. libFuzzer runs in-process,
# one target at a time (no -jobs/-workers, which fork more processes), so the
# machine stays usable. Exit status: 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config sniff identity delta_stream audit_verify)
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
flags=(--sanitizer none --release --debug-assertions)

# Build once, then run the binaries themselves: `cargo fuzz run` would
# rebuild first, against whatever the source tree holds at that moment.
# NO_BUILD=1 runs what was built last.
if [ -z "${NO_BUILD:-}" ]; then
    echo "building fuzz targets..."
    cargo fuzz build "${flags[@]}" >/dev/null 2>build.log || { cat build.log; exit 2; }
    rm -f build.log
fi
bin_dir=$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release

mkdir -p logs
status=0
printf '%-14s %8s %12s %10s %s\n' target seconds execs execs/s result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    dict=()
    [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
    log="logs/$t.log"
    start=$(date +%s)
    set +e
    "$bin_dir/$t" "${dict[@]}" -max_total_time="$secs" -print_final_stats=1 \
        -rss_limit_mb=2048 -timeout=10 -artifact_prefix="artifacts/$t/" \
        "corpus/$t" "${seeds[@]}" >"$log" 2>&1
    rc=$?
    set -e
    # audit_verify's scratch directory (libFuzzer exits without unwinding).
    rm -rf /dev/shm/bulwark-fuzz-audit-* "${TMPDIR:-/tmp}"/bulwark-fuzz-audit-*
    took=$(( $(date +%s) - start ))
    # A crash ends the run without final stats: then the last status line's count.
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    execs=${execs:-0}
    rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    rate=${rate:-$(( execs / (took > 0 ? took : 1) ))}
    if [ $rc -eq 0 ]; then
        result="no crash"
    else
        status=1
        art=$(ls -t "artifacts/$t" 2>/dev/null | head -1)
        result="CRASH (exit $rc) artifacts/$t/$art; see fuzz/$log"
    fi
    printf '%-14s %8s %12s %10s %s\n' "$t" "$took" "$execs" "$rate" "$result"
done
exit $status
