#!/usr/bin/env bash
# Soak: the local mesh (`bulwark up`) under moderate load for a long time,
# with certificates rotating every ~30 s (1-minute SVIDs, renewed at about
# half their life) and the canary weight flipped every few seconds in the
# config directory the control plane watches. Every 10 s it samples each
# sidecar's RSS (/proc/PID/status VmRSS) and open descriptors
# (/proc/PID/fd) into a CSV.
#
#   sudo tests/perf/soak.sh [minutes]        (default 30)
#
# Environment: BULWARK (binary; default: build and use target/release/bulwark),
# RPS (load, default 50), FLIP_SECS (config change period, default 5),
# SVID_TTL (default 1m), OUT (output dir, default /tmp/bulwark-soak-<time>).
#
# Verdict (exit 1 on failure). The samples after a one-minute warm-up are
# cut into thirds; for each sidecar, growth without bound means the last
# third's average exceeds the first third's by more than the margin AND the
# last third is still rising (its second half above its first half):
#   RSS: margin 20% + 4 MiB;   descriptors: margin 16.
# Also fails if more than 1% of requests failed, or if the mesh died.
# Prints start/end RSS and descriptors per sidecar, requests, errors,
# certificate rotations and config changes.
set -euo pipefail

minutes=${1:-30}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
[ "$(id -u)" -eq 0 ] || { echo "soak: run as root (bulwark up creates network namespaces)" >&2; exit 2; }

RPS=${RPS:-50}
FLIP_SECS=${FLIP_SECS:-5}
SVID_TTL=${SVID_TTL:-1m}
SAMPLE_SECS=10
WARMUP_SECS=60
RSS_MARGIN_PCT=20
RSS_MARGIN_KB=4096
FD_MARGIN=16
MAX_ERROR_RATE=0.01
OUT=${OUT:-/tmp/bulwark-soak-$(date +%Y%m%d-%H%M%S)}
STATE_DIR=/run/bulwark-soak

if [ -z "${BULWARK:-}" ]; then
    cargo build --release --bin bulwark >&2
    BULWARK=$repo/target/release/bulwark
fi
mkdir -p "$OUT"
cfg=$OUT/config
rm -rf "$cfg"
cp -r deploy/examples "$cfg"
route=$cfg/api-traffic.yaml
grep -q 'weight: 90$' "$route" || { echo "soak: $route has no 'weight: 90' to flip" >&2; exit 2; }
csv=$OUT/samples.csv
echo "t_s,pod,pid,rss_kb,fds,svids_installed" >"$csv"

echo "soak: ${minutes} min, ${RPS} rps, SVID TTL ${SVID_TTL}, config flip every ${FLIP_SECS}s, output in $OUT"
"$BULWARK" up --config "$cfg" --duration "${minutes}m" --rps "$RPS" --svid-ttl "$SVID_TTL" \
    --state-dir "$STATE_DIR" >"$OUT/up.log" 2>&1 &
up=$!
flipper=
cleanup() {
    [ -n "$flipper" ] && kill "$flipper" 2>/dev/null || true
    if kill -0 "$up" 2>/dev/null; then
        # Ends the run early; up tears the mesh down on SIGINT.
        kill -INT "$up" 2>/dev/null || true
        wait "$up" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The measured run starts when up prints its first progress line.
for _ in $(seq 1 300); do
    grep -q '^progress:' "$OUT/up.log" 2>/dev/null && break
    kill -0 "$up" 2>/dev/null || { echo "soak: bulwark up exited during bring-up:" >&2; tail -20 "$OUT/up.log" >&2; exit 1; }
    sleep 1
done
grep -q '^progress:' "$OUT/up.log" || { echo "soak: mesh not up after 300 s" >&2; exit 1; }

# Sidecars: up's children whose arguments start with `sidecar`.
declare -A sidecar
for pid in $(pgrep -P "$up"); do
    args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    case "$args" in
    *" sidecar "*)
        pod=$(ip netns identify "$pid" 2>/dev/null)
        sidecar[${pod#bwup-}]=$pid
        ;;
    esac
done
[ ${#sidecar[@]} -gt 0 ] || { echo "soak: no sidecar processes found under pid $up" >&2; exit 1; }
echo "soak: sidecars: $(for p in "${!sidecar[@]}"; do printf '%s=%s ' "$p" "${sidecar[$p]}"; done)"

# Config changes: flip the canary between 90/10 and 50/50. Written beside
# and renamed, so the watcher never reads half a file (dot files are ignored).
cp "$route" "$OUT/route-90-10.yaml"
sed -e 's/weight: 90$/weight: 50/' -e 's/weight: 10$/weight: 50/' "$route" >"$OUT/route-50-50.yaml"
(
    n=0
    while true; do
        sleep "$FLIP_SECS"
        n=$((n + 1))
        if [ $((n % 2)) -eq 1 ]; then next=route-50-50.yaml; else next=route-90-10.yaml; fi
        cp "$OUT/$next" "$cfg/.flip"
        mv "$cfg/.flip" "$route"
        echo "$n" >"$OUT/flips"
    done
) &
flipper=$!

start=$(date +%s)
while kill -0 "$up" 2>/dev/null; do
    t=$(($(date +%s) - start))
    for pod in "${!sidecar[@]}"; do
        pid=${sidecar[$pod]}
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        [ -n "$rss" ] || continue
        fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
        # Certificates the sidecar has installed so far (the first + renewals).
        svids=$(grep -c -F 'SVID installed' "$STATE_DIR/logs/$pod-sidecar.log" 2>/dev/null || true)
        echo "$t,$pod,$pid,$rss,$fds,${svids:-0}" >>"$csv"
    done
    # Sleep in short steps so the end of the run is noticed promptly.
    for _ in $(seq 1 $((SAMPLE_SECS * 2))); do
        kill -0 "$up" 2>/dev/null || break
        sleep 0.5
    done
done
kill "$flipper" 2>/dev/null || true
flipper=
up_rc=0
wait "$up" || up_rc=$?
flips=$(cat "$OUT/flips" 2>/dev/null || echo 0)

summary=$(grep '^summary: window_s=' "$OUT/up.log" || true)
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$summary"; }
requests=$(field requests)
failed=$(field failed)

echo
echo "soak: sampled for $(($(date +%s) - start)) s; bulwark up exit $up_rc; samples in $csv"
growth_rc=0
verdict=$(awk -F, -v warm=$WARMUP_SECS -v rp=$RSS_MARGIN_PCT -v rk=$RSS_MARGIN_KB -v fm=$FD_MARGIN '
    NR == 1 { next }
    { pods[$2] = 1; n[$2]++; t[$2, n[$2]] = $1; r[$2, n[$2]] = $4; f[$2, n[$2]] = $5; c[$2] = $6 }
    function avg(a, p, i, j,   s, k) { s = 0; for (k = i; k <= j; k++) s += a[p, k]; return j >= i ? s / (j - i + 1) : 0 }
    END {
        bad = 0
        printf "%-8s %9s %9s %9s %9s %6s %6s %6s %6s %6s %s\n", "pod", "rss0_kb", "rss_end", "rss_1/3", "rss_3/3", "fd0", "fd_end", "fd_1/3", "fd_3/3", "renews", "verdict"
        for (p in pods) {
            s = 1; while (s <= n[p] && t[p, s] < warm) s++
            m = n[p] - s + 1
            if (m < 6) { printf "%-8s too few samples after warm-up (%d)\n", p, m; bad = 1; continue }
            third = int(m / 3); a1 = s; b1 = s + third - 1; a3 = n[p] - third + 1; b3 = n[p]
            half = int(third / 2)
            rf = avg(r, p, a1, b1); rl = avg(r, p, a3, b3)
            ff = avg(f, p, a1, b1); fl = avg(f, p, a3, b3)
            rrise = avg(r, p, a3 + half, b3) > avg(r, p, a3, a3 + half - 1)
            frise = avg(f, p, a3 + half, b3) > avg(f, p, a3, a3 + half - 1)
            v = "ok"
            if (rl > rf * (1 + rp / 100) + rk && rrise) { v = "RSS GROWING"; bad = 1 }
            if (fl > ff + fm && frise) { v = (v == "ok" ? "" : v ", ") "FDS GROWING"; bad = 1 }
            printf "%-8s %9d %9d %9.0f %9.0f %6d %6d %6.1f %6.1f %6d %s\n", p, r[p, 1], r[p, n[p]], rf, rl, f[p, 1], f[p, n[p]], ff, fl, c[p] - 1, v
        }
        exit bad
    }' "$csv") || growth_rc=$?
echo "$verdict"
echo "soak: requests=${requests:-?} failed=${failed:-?} config_changes=$flips (renews: certificates installed after the first)"
grep '^summary: result=' "$OUT/up.log" || true

fail=0
[ $growth_rc -eq 0 ] || { echo "soak: FAIL: RSS or descriptors grow without bound"; fail=1; }
if [ -z "$requests" ] || [ "$requests" -eq 0 ]; then
    echo "soak: FAIL: no request count (mesh died?); see $OUT/up.log"
    fail=1
elif awk -v f="$failed" -v r="$requests" -v m=$MAX_ERROR_RATE 'BEGIN { exit !(f / r > m) }'; then
    echo "soak: FAIL: $failed of $requests requests failed (more than $MAX_ERROR_RATE)"
    fail=1
fi
[ $fail -eq 0 ] && echo "soak: PASS"
exit $fail
