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
# How: tests/perf/run.sh's rig (HOLD=1), four times.
#  1. Both sidecars under callgrind, which lists every function that ran: its
#     counts are dumped once the sidecars are ready (start-up), and again
#     after one pass of each kind of traffic run.sh measures (HTTP/1.1, h2c,
#     a new connection per request, opaque TCP, idle client connections, a
#     metrics scrape). Twice: with the config from a file, and from a
#     control plane.
#  2. The sidecars start natively with every page fault recorded, then run
#     under `perf record` through the same traffic: valgrind has no AVX-512,
#     so the CPU-specific routines the crypto library picks on this machine
#     (AES-GCM, X25519, ML-KEM) are only seen here.
# An idle sidecar runs only its start-up code, so start-up comes first and
# packed: the functions that also serve traffic (by instructions run under
# traffic), the CPU-specific ones it faulted on natively, the rest of
# start-up (both ways of configuring, then a control plane's own, then a
# file's). Traffic-only functions follow (by instructions run, then the
# natively sampled ones): under load they are all mapped anyway.
#
# The names are mangled symbols. They stay the same across most source edits
# but not across a compiler or dependency version change (regenerate the file
# then, and when run.sh reports that many listed names are missing). Fat
# LTO's numbered copies (name.N) are renumbered by any edit; build.rs lists
# them without the number and places every copy. A name
# the program no longer has is skipped by the linker: a stale file costs
# memory, never a failed build.
# Environment: SKIP_BUILD=1 (use target/release/bulwark as built),
# KEEP_TRACES=1 (keep the traces and rig logs in the directory it prints).
set -euo pipefail
ROOT=$(cd -P "$(dirname "$0")/../.." && pwd -P) # as valgrind names it
OUT=$ROOT/src/link/hot-text.order
die() { echo "text_order.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, as run.sh)"
for tool in valgrind callgrind_control perf nm; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install -y valgrind linux-perf binutils)"
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # As run.sh builds: the program alone, then the load generator (whose
    # dev-dependencies must not change the program's features, or names).
    (cd "$ROOT" && cargo build --release --locked && cargo build --release --locked --example loadgen)
fi
BIN=$ROOT/target/release/bulwark
TMP=$(mktemp -d /tmp/bworder.XXXXXX)
RIG_PID= HOLD_DIR= PERF= PASS=0
stop_rig() {
    if [ -n "$HOLD_DIR" ]; then
        touch "$HOLD_DIR/stop"
    elif [ -n "$RIG_PID" ]; then
        kill -TERM "$RIG_PID" 2>/dev/null || true # run.sh cleans up on TERM
    fi
    [ -n "$RIG_PID" ] && { wait "$RIG_PID" 2>/dev/null || true; }
    RIG_PID= HOLD_DIR= PERF=
}
finish() {
    local rc=$?
    [ -n "$PERF" ] && kill -INT "$PERF" 2>/dev/null
    stop_rig
    if [ $rc -ne 0 ] || [ "${KEEP_TRACES:-0}" = 1 ]; then echo "text_order.sh: logs in $TMP" >&2; else rm -rf "$TMP"; fi
    exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

start_rig() { # sidecar-program config-source [ready-hook]
    PASS=$((PASS + 1))
    local log="$TMP/rig-$PASS.log" _
    SKIP_BUILD=1 HOLD=1 CONTROL_PLANE=0 SIDECAR_BIN="$1" CONFIG_SOURCE="$2" READY_HOOK="${3:-}" \
        "$ROOT/tests/perf/run.sh" >"$log" 2>&1 &
    RIG_PID=$!
    for _ in $(seq 1 600); do
        HOLD_DIR=$(sed -nE 's/.*holding: (.*)\/rig\.env.*/\1/p' "$log")
        [ -n "$HOLD_DIR" ] && break
        kill -0 "$RIG_PID" 2>/dev/null || die "run.sh ended early: $(tail -3 "$log")"
        sleep 0.5
    done
    [ -n "$HOLD_DIR" ] || die "the rig did not come up: $(tail -3 "$log")"
    # shellcheck disable=SC1091
    . "$HOLD_DIR/rig.env"
}

traffic() {
    local ns=(ip netns exec "$CLI") _ idle
    "${ns[@]}" wrk -t1 -c8 -d3 "$URL_bulwark" >/dev/null
    "${ns[@]}" h2load -n2000 -c2 -m16 "$URL_bulwark" >/dev/null
    for _ in 1 2 3 4 5; do "${ns[@]}" curl -fsS -o /dev/null -H 'Connection: close' "$URL_bulwark"; done
    "${ns[@]}" curl -fsS -o /dev/null --http2-prior-knowledge "$URL_bulwark"
    "${ns[@]}" iperf3 -c 198.18.100.1 -p 5201 -t 2 >/dev/null
    "${ns[@]}" iperf3 -c 198.18.100.1 -p 5201 -t 2 -P 4 >/dev/null
    rm -f "$TMP/idle.ready"
    "${ns[@]}" python3 "$ROOT/tests/perf/idle_conns.py" 198.18.100.1 8080 50 "$TMP/idle.ready" >/dev/null &
    idle=$!
    for _ in $(seq 1 300); do [ -e "$TMP/idle.ready" ] && break; sleep 0.1; done
    kill "$idle" 2>/dev/null || true
    "${ns[@]}" curl -fsS -o /dev/null http://198.18.0.2:15020/metrics
}

# ---- 1. callgrind ------------------------------------------------------------
cat >"$TMP/sidecar" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$TMP/cg.%p --demangle=no \\
    --dump-instr=no --compress-strings=no --compress-pos=no "$BIN" "\$@"
EOF
chmod +x "$TMP/sidecar"
dump() { # n: every sidecar writes its counts since the last dump to cg.PID.n
    # (callgrind numbers its dumps: n must be this pass's next)
    local p _ SC_CLI=${SC_CLI:?} SC_SRV=${SC_SRV:?}
    for p in $SC_CLI $SC_SRV; do callgrind_control --dump="phase-$1" "$p" >/dev/null 2>&1; done
    # callgrind writes the dump at its next scheduling point: wait for both.
    for _ in $(seq 1 100); do
        [ -e "$TMP/cg.$SC_CLI.$1" ] && [ -e "$TMP/cg.$SC_SRV.$1" ] && return 0
        sleep 0.1
    done
    die "callgrind dump $1 did not appear"
}
# Both ways a sidecar gets its config: a file (the benchmark's default), and
# a control plane's discovery stream (Kubernetes, `bulwark up`).
# Start-up is dumped by run.sh's READY_HOOK, once the sidecars are ready and
# have idled, before any request through them: run.sh's own checks send
# requests before it holds.
export -f dump die
export TMP
for source in file xds; do
    start_rig "$TMP/sidecar" "$source" "dump 1"
    traffic
    dump 2 # traffic
    stop_rig
    mkdir "$TMP/$source"
    mv "$TMP"/cg.* "$TMP/$source/"
done

# ---- 2. native samples -------------------------------------------------------
# Start-up natively, every page fault recorded: the crypto library picks
# CPU-specific routines (X25519, ML-KEM) that valgrind never runs, and a
# TLS handshake to the CA runs them once, too briefly for sampling to see.
perf record -e page-faults -c 1 -d -a -o "$TMP/faults.data" >"$TMP/faults.log" 2>&1 &
PERF=$!
sleep 1
kill -0 "$PERF" 2>/dev/null || die "perf record failed: $(tail -3 "$TMP/faults.log")"
# The hook ends the recording before the rig's own requests.
start_rig "$BIN" xds "kill -INT $PERF; while kill -0 $PERF 2>/dev/null; do sleep 0.1; done"
wait "$PERF" || true
PERF=
echo "$SC_CLI $SC_SRV" >"$TMP/faults.pids"
stop_rig
perf script -i "$TMP/faults.data" -F pid,addr --show-mmap-events >"$TMP/faults.txt" 2>"$TMP/faults.err" ||
    die "perf script failed: $(tail -3 "$TMP/faults.err")"
start_rig "$BIN" file
perf record -e cpu-clock -F 2000 -o "$TMP/perf.data" -p "$SC_CLI,$SC_SRV" >"$TMP/perf.log" 2>&1 &
PERF=$!
# perf says nothing until it stops; give it a moment to attach first.
sleep 1
kill -0 "$PERF" 2>/dev/null || die "perf record failed: $(tail -3 "$TMP/perf.log")"
traffic
kill -INT "$PERF"
wait "$PERF" || true
PERF=
stop_rig
perf report -i "$TMP/perf.data" --no-demangle --stdio --sort dso,sym -q 2>/dev/null |
    awk '$2 == "bulwark" && $3 == "[.]" { print $4 }' >"$TMP/native.txt"

# ---- the file ----------------------------------------------------------------
python3 - "$TMP" "$BIN" "$OUT" <<'EOF'
import collections, glob, os, subprocess, sys
tmp, binary, out = sys.argv[1:]
binary = os.path.realpath(binary)
# The program's functions, from one nm pass: (address, size, name). nm
# prints address, [size,] type, name: assembly routines often have no size.
functions = []
for line in subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) >= 3 and parts[-2] in "tTwW":
        size = int(parts[1], 16) if len(parts) == 4 else 0
        functions.append((int(parts[0], 16), size, parts[-1]))
ours = {name for _, _, name in functions}
def faulted(tmp, binary):
    """Functions of the program on which the sidecars' start-up took a page
    fault (perf script -F pid,addr --show-mmap-events), in fault order."""
    import bisect, re
    pids = open(f"{tmp}/faults.pids").read().split()
    syms = sorted((address, name) for address, _, name in functions)
    addrs = [a for a, _ in syms]
    bias, text, names = {}, {}, []
    for line in open(f"{tmp}/faults.txt", errors="replace"):
        m = re.search(r" (\d+)/\d+: \[0x([0-9a-f]+)\(0x([0-9a-f]+)\) @ (?:0x)?([0-9a-f]+) .*: (\S+) (\S+)$", line)
        if m:
            pid, start, size, off, prot, path = m.groups()
            if pid in pids and os.path.realpath(path) == binary:
                start, size, off = int(start, 16), int(size, 16), int(off, 16)
                if off == 0:
                    bias.setdefault(pid, start)  # the program's first mapping
                if "x" in prot:
                    text[pid] = (start, start + size)
            continue
        f = line.split()
        if len(f) == 2 and f[0] in text and f[0] in bias:
            a = int(f[1], 16)
            lo, hi = text[f[0]]
            if lo <= a < hi:
                i = bisect.bisect_right(addrs, a - bias[f[0]]) - 1
                if i >= 0 and syms[i][1] not in names:
                    names.append(syms[i][1])
    if not all(p in text and p in bias for p in pids):
        sys.exit(f"text_order.sh: perf recorded no mapping of {binary} for sidecars {pids}")
    return names
def costs(source, suffix):
    """Self cost (instructions) of each function of the program in a dump."""
    total = collections.Counter()
    for path in glob.glob(f"{tmp}/{source}/cg.*.{suffix}"):
        ob, fn, after_call = "", None, False
        for line in open(path, errors="replace"):
            if line.startswith("ob="):
                ob = os.path.realpath(line[3:].strip())
            elif line.startswith("fn="):
                fn, after_call = (line[3:].strip() if ob == binary else None), False
                if fn:
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
start = {s: costs(s, 1) for s in ("file", "xds")}
traffic = costs("file", 2)
traffic.update(costs("xds", 2))  # (update keeps functions with no cost of their own)
if not traffic or not all(start.values()):
    sys.exit(f"text_order.sh: no function of {binary} in the callgrind dumps")
native = [l.strip() for l in open(f"{tmp}/native.txt")]
# Native-only start-up functions: faulted on now, not seen by callgrind. The
# kernel maps 64 KiB around a fault, so one that the current layout already
# packs among start-up code takes no fault of its own: those the current
# file lists and callgrind does not know are kept too.
started_anywhere = set(start["file"]) | set(start["xds"]) | set(traffic)
listed = [l.strip() for l in open(out)] if os.path.exists(out) else []
# (dict: once each, in order, so the count printed below is of functions.)
native_start = list(dict.fromkeys(
    [f for f in faulted(tmp, binary) if f not in started_anywhere]
    + [f for f in listed if f not in started_anywhere and f not in native]
))
both = set(start["file"]) & set(start["xds"])
def ranked(c, among=None):
    """Functions of counter c, most instructions first (those run with no
    cost of their own included), only those in among if given."""
    return [f for f, _ in c.most_common() if among is None or f in among]
# An idle sidecar runs only its start-up code, so that comes first, packed
# (the idle memory is the windows it touches): what also serves traffic,
# hottest first; the CPU-specific routines; the rest of start-up, both ways
# of configuring, then a control plane's own (the default), then a file's.
# Traffic-only code follows: under load all of it is mapped anyway.
started = collections.Counter()
for c in start.values():
    started.update(c)
order, seen = [], set()
for f in (
    ranked(traffic, both)
    + native_start
    + ranked(started, both)
    + ranked(start["xds"])
    + ranked(start["file"])
    + ranked(traffic)
    + native
):
    if f in ours and f not in seen:
        order.append(f)
        seen.add(f)
with open(out, "w") as o:
    o.write("".join(f + "\n" for f in order))
added = sum(1 for f in set(native) if f in ours and f not in traffic)
idle = [f for f in order if f in start["xds"] or f in native_start]
sizes = {name: size for _, size, name in functions}
print(f"text_order.sh: {len(traffic)} traffic functions, {added} more sampled natively, "
      f"{len(native_start)} run natively at start-up only; "
      f"{len(idle)} run by a sidecar fed by a control plane before any traffic "
      f"({sum(sizes.get(f, 0) for f in idle) / 1e6:.1f} MB), {len(order)} in all -> {out}")
EOF
