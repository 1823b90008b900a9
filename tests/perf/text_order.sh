#!/usr/bin/env bash
# Regenerates src/link/hot-text.order: the functions a sidecar runs, which
# the release link (build.rs) places together at the start of .text.
#
#   sudo tests/perf/text_order.sh          # build, trace, rewrite the file
#
# Why: the kernel maps a program's text into a process 64 KiB at a time
# around each page it first runs (fault-around). A sidecar runs about
# 3.7 MB of functions spread over 20 MB of text, in about 200 such windows,
# so 12-13 MB of text were resident in every idle sidecar. Packed together,
# the same functions fit in about 60 windows.
#
# How: tests/perf/run.sh's rig (HOLD=1) with both sidecars under callgrind;
# callgrind lists every function that ran. The file is dumped once the
# sidecars are ready (start-up), and once more after one pass of each kind
# of traffic run.sh measures (HTTP/1.1, h2c, a new connection per request,
# opaque TCP, idle client connections, a metrics scrape). Hot traffic
# functions come first (by instructions run), then the rest.
#
# The names are mangled symbols; they stay the same across source edits as
# long as dependencies and the compiler do. A name the program no longer has
# is skipped by the linker, so a stale file costs memory, never a failed
# build; run.sh prints how much of the file the built program still has.
# Environment: SKIP_BUILD=1 (use target/release/bulwark as built).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/src/link/hot-text.order
die() { echo "text_order.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, as run.sh)"
command -v valgrind >/dev/null || die "needs valgrind (apt-get install -y valgrind)"
command -v callgrind_control >/dev/null || die "needs callgrind_control (valgrind)"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release --locked --bin bulwark --example loadgen)
fi
BIN=$ROOT/target/release/bulwark
TMP=$(mktemp -d /tmp/bworder.XXXXXX)
RIG_PID=
finish() {
    local rc=$?
    [ -n "${HOLD_DIR:-}" ] && touch "$HOLD_DIR/stop"
    [ -n "$RIG_PID" ] && wait "$RIG_PID" 2>/dev/null
    if [ $rc -ne 0 ]; then echo "text_order.sh: logs in $TMP" >&2; else rm -rf "$TMP"; fi
    exit $rc
}
trap finish EXIT

cat >"$TMP/sidecar" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$TMP/cg.%p --demangle=no \\
    --dump-instr=no --compress-strings=no --compress-pos=no "$BIN" "\$@"
EOF
chmod +x "$TMP/sidecar"

SKIP_BUILD=1 HOLD=1 CONTROL_PLANE=0 SIDECAR_BIN="$TMP/sidecar" "$ROOT/tests/perf/run.sh" \
    >"$TMP/rig.log" 2>&1 &
RIG_PID=$!
for _ in $(seq 1 600); do
    HOLD_DIR=$(sed -nE 's/.*holding: (.*)\/rig\.env.*/\1/p' "$TMP/rig.log")
    [ -n "$HOLD_DIR" ] && break
    kill -0 "$RIG_PID" 2>/dev/null || die "run.sh ended early: $(tail -3 "$TMP/rig.log")"
    sleep 0.5
done
[ -n "$HOLD_DIR" ] || die "the rig did not come up: $(tail -3 "$TMP/rig.log")"
# shellcheck disable=SC1091
. "$HOLD_DIR/rig.env"

dump() { # name: every sidecar writes its counts since the last dump
    local p n
    for p in $SC_CLI $SC_SRV; do callgrind_control -d "$1" "$p" >/dev/null 2>&1; done
    # callgrind writes the dump at its next scheduling point: wait for both.
    n=$(ls "$TMP"/cg.*.* 2>/dev/null | wc -l)
    for _ in $(seq 1 100); do
        [ "$(ls "$TMP"/cg.*.* 2>/dev/null | wc -l)" -ge "$2" ] && return 0
        sleep 0.1
    done
    die "callgrind dump '$1' did not appear (have $n files)"
}
dump startup 2
ns() { ip netns exec "$CLI" "$@"; }
ns wrk -t1 -c8 -d3 "$URL_bulwark" >/dev/null
ns h2load -n2000 -c2 -m16 "$URL_bulwark" >/dev/null
for _ in 1 2 3 4 5; do ns curl -fsS -o /dev/null -H 'Connection: close' "$URL_bulwark"; done
ns curl -fsS -o /dev/null --http2-prior-knowledge "$URL_bulwark"
ns iperf3 -c 198.18.100.1 -p 5201 -t 2 >/dev/null
ns iperf3 -c 198.18.100.1 -p 5201 -t 2 -P 4 >/dev/null
ns python3 "$ROOT/tests/perf/idle_conns.py" 198.18.100.1 8080 50 "$TMP/idle.ready" >/dev/null &
IDLE=$!
for _ in $(seq 1 300); do [ -e "$TMP/idle.ready" ] && break; sleep 0.1; done
kill "$IDLE" 2>/dev/null || true
ns curl -fsS -o /dev/null http://198.18.0.2:15020/metrics
dump traffic 4

# Self cost (instructions) of each function, per phase.
python3 - "$TMP" "$BIN" "$OUT" <<'EOF'
import collections, glob, subprocess, sys
tmp, binary, out = sys.argv[1:]
# Functions of the program (nm: address, size, type, name).
ours = set()
for line in subprocess.run(["nm", "-S", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 4 and parts[2] in "tTwW":
        ours.add(parts[3])
def costs(suffix):
    total = collections.Counter()
    for path in glob.glob(f"{tmp}/cg.*.{suffix}"):
        fn, after_call = None, False
        for line in open(path, errors="replace"):
            if line.startswith("fn="):
                fn, after_call = line[3:].strip(), False
                total[fn] += 0
            elif line.startswith("calls="):
                after_call = True  # the next cost line is the callee's, inclusive
            elif fn and (line[:1].isdigit() or line[:1] in "+-*"):
                if after_call:
                    after_call = False
                    continue
                f = line.split()
                if len(f) >= 2 and f[1].isdigit():
                    total[fn] += int(f[1])
    return total
startup, traffic = costs(1), costs(2)
hot = [f for f, _ in traffic.most_common() if f in ours]
rest = [f for f, _ in startup.most_common() if f in ours and f not in traffic]
with open(out, "w") as o:
    o.write("".join(f + "\n" for f in hot + rest))
print(f"text_order.sh: {len(hot)} traffic and {len(rest)} start-up functions -> {out}")
EOF
