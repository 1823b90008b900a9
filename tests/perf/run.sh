#!/usr/bin/env bash
# Bulwark vs HAProxy vs direct, side by side, in one run.
#
#   sudo tests/perf/run.sh                 # build, measure, print the table
#   sudo QUIET_WAIT=900 tests/perf/run.sh --record   # wait for a quiet machine,
#                                                    # append the table to RESULTS.md
#
# Two pods (network namespaces `cli` and `srv`) on a bridge in a third
# "switch" namespace, which also runs the Bulwark CA, as in tests/netns/.
# The server pod runs the backend (`bulwark demo-app --body-bytes 1024`) and
# iperf3 servers; three set-ups are measured in interleaved rounds (the order
# rotates every round):
#   direct   cli app ──────────────────────────────────────────► srv:9090 app
#   bulwark  cli app → VIP:8080 → cli sidecar ══mTLS══► srv sidecar → 127.0.0.1:8080 app
#   haproxy  cli app → 127.0.0.1:10080 haproxy ══mTLS══► srv:9443 haproxy → 127.0.0.1:9090 app
# Every TLS certificate is an ECDSA P-256 SVID from the same `bulwark ca`.
# The direct and HAProxy ports are excluded from interception with
# `bulwark init --exclude-outbound-ports/--exclude-inbound-ports`.
#
# Metrics (each one a median over rounds of per-round ratios/differences):
#  1. added latency at a fixed rate (1k and 5k req/s, HTTP/1.1 keep-alive,
#     `loadgen`: open loop, latency from each request's scheduled time);
#  2. saturation throughput: wrk (HTTP/1.1 keep-alive), h2load (HTTP/2 h2c);
#  3. CPU per request per proxy at 5k req/s (utime+stime of each proxy
#     process from /proc/PID/stat, pair total / requests / 2);
#  4. bulk TCP: iperf3, 1 and 4 streams (Bulwark: a `protocol: tcp` port;
#     HAProxy: `mode tcp`, ssl both sides);
#  5. a new app connection per request: wrk with `Connection: close`, and
#     the server sidecar's TLS handshake count before and after (pooled
#     sidecar-to-sidecar connections: it must not grow);
#  6. memory: each proxy's RSS before any traffic, and the client-side
#     proxy's RSS growth with 1,000 mostly idle client connections;
#  7. control plane: 1,000 mTLS streams ACKing a change (the xds_scale
#     test), and CA signatures/s on one core (the ca_signing_throughput
#     test under `taskset -c 0`) against `openssl speed ecdsap256`.
# The table at the end puts each figure beside issue #7's target, with PASS
# or FAIL computed from the ratios measured in this run.
#
# Environment: ROUNDS (3), LAT_SECS (6), LAT_WARMUP (1), SAT_SECS (5),
# IPERF_SECS (4), CONNS (8, loadgen connections), WRK_CONNS (16),
# IDLE_CONNS (1000), IDLE_WAKE_SECS (5, the idle wake-up window),
# CONTROL_PLANE (1: run the control-plane and CA figures),
# CONFIG_SOURCE (xds: a control plane serves the mesh config, as in
# Kubernetes and `bulwark up`; file: each sidecar reads it, `--config`),
# SIDECAR_THREADS (the sidecars' --worker-threads; empty: their default, 1),
# HAPROXY_THREADS (HAProxy's nbthread; default: as many as each sidecar
# runs, 1 unless SIDECAR_THREADS says otherwise, the one thread per proxy of
# issue #7's own HAProxy figures),
# SIDECAR_ARGS (more sidecar options, e.g. "--park-idle-http false"),
# QUIET_WAIT (0: seconds to wait for the 1-minute load average to fall
# below QUIET_LOAD=0.8 first), BULWARK_ACCESS_LOG (off | stdout), PROFILE=1
# (after the rounds, `perf record` both sidecars under wrk and print the
# top symbols), SKIP_BUILD=1, KEEP=1 (leave logs in $WORK), READY_HOOK (a
# command run once the sidecars are ready and have idled, before any request
# through them; SC_CLI and SC_SRV hold their PIDs), HOLD=1 (set up,
# then wait, for measurements by hand, until $WORK/stop exists), MEASURE (which
# data-plane figures to take, a subset of "latency wrk h2load close iperf
# memory"; default all: a subset is for trying a change, not for the record).
# Options: --record appends the results to tests/perf/RESULTS.md.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
LAT_SECS=${LAT_SECS:-6}
LAT_WARMUP=${LAT_WARMUP:-1}
SAT_SECS=${SAT_SECS:-5}
IPERF_SECS=${IPERF_SECS:-4}
CONNS=${CONNS:-8}
WRK_CONNS=${WRK_CONNS:-16}
QUIET_WAIT=${QUIET_WAIT:-0}
IDLE_CONNS=${IDLE_CONNS:-1000}
CONTROL_PLANE=${CONTROL_PLANE:-1}
CONFIG_SOURCE=${CONFIG_SOURCE:-xds}
case $CONFIG_SOURCE in file | xds) ;; *) echo "run.sh: CONFIG_SOURCE is file or xds" >&2; exit 2 ;; esac
SIDECAR_THREADS=${SIDECAR_THREADS:-}
SIDECAR_ARGS=${SIDECAR_ARGS:-}
HAPROXY_THREADS=${HAPROXY_THREADS:-${SIDECAR_THREADS:-1}}
QUIET_LOAD=${QUIET_LOAD:-0.8}
BULWARK_ACCESS_LOG=${BULWARK_ACCESS_LOG:-off}
PROFILE=${PROFILE:-0}
MEASURE=${MEASURE:-latency wrk h2load close iperf memory}
measuring() { [[ " $MEASURE " == *" $1 "* ]]; }
BODY=1024
RECORD=0
for arg in "$@"; do
    case "$arg" in
    --record) RECORD=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "run.sh: unknown argument $arg (try --help)" >&2
        exit 2
        ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
T0=$(date +%s)
log() { printf '[%4ds] %s\n' $(($(date +%s) - T0)) "$*" >&2; }
die() {
    echo "run.sh: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, iptables): sudo $0"
# 1,000 idle connections through a proxy, plus its upstream side.
ulimit -n "$(ulimit -Hn)"

# ---- tools -----------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v haproxy >/dev/null || need+=(haproxy)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# A distribution package may start its own daemon; we start our own.
if pgrep -x haproxy >/dev/null 2>&1 && command -v systemctl >/dev/null; then
    systemctl stop haproxy 2>/dev/null || true
fi

# ---- build -----------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release (and the loadgen example)"
    cargo build --release --locked -q
    cargo build --release --locked -q --example loadgen
    if [ "$CONTROL_PLANE" = 1 ]; then
        cargo test --release --locked -q --test xds_scale --test ca --no-run 2>/dev/null
    fi
fi
BIN=${BIN:-$ROOT/target/release/bulwark}
# The sidecars' program (default: the same); tests/perf/text_order.sh runs them under callgrind.
SIDECAR_BIN=${SIDECAR_BIN:-$BIN}
LOADGEN=$ROOT/target/release/examples/loadgen
[ -x "$BIN" ] && [ -x "$LOADGEN" ] || die "missing $BIN or $LOADGEN"
# How much of build.rs's hot-text layout the program has: functions renamed
# since tests/perf/text_order.sh last ran are laid out as if not listed.
HOT_ORDER=$ROOT/src/link/hot-text.order
if [ -s "$HOT_ORDER" ]; then
    # A Rust function's numbered LTO copy (name.N) counts under any number: build.rs places them all.
    ORDER_FOUND="$(nm "$BIN" | awk 'function base(s) { if (s ~ /^_(ZN|R)/) sub(/\.[0-9]+$/, "", s); return s }
        NR == FNR { have[base($NF)] = 1; next } (base($1) in have) { n++ } END { print n + 0 }' - "$HOT_ORDER") of $(wc -l <"$HOT_ORDER")"
    log "hot-text layout: $ORDER_FOUND listed functions are in $BIN"
fi
# Every shared library loaded costs each sidecar its resident pages (src/math.rs).
# A wrapper script (a profiler, an environment) is not an ELF file: read the program.
LIB_BIN=$SIDECAR_BIN
[ "$(head -c4 "$SIDECAR_BIN" | tr -d '\177')" = ELF ] || LIB_BIN=$BIN
SHARED_LIBS=$(readelf -d "$LIB_BIN" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p' | tr '\n' ' ')
log "shared libraries of $LIB_BIN: $SHARED_LIBS"
case " $SHARED_LIBS" in
*" libm.so"*) log "WARNING: the program loads the C math library again: a new call to a C math function? (src/math.rs)" ;;
esac
# The test binaries as built (not `cargo test`, which would rebuild after a
# source change, in the middle of the measurements).
test_bin() { find "$ROOT/target/release/deps" -maxdepth 1 -type f -executable -name "$1-*" -printf '%T@ %p\n' | sort -g | tail -1 | cut -d' ' -f2-; }
if [ "$CONTROL_PLANE" = 1 ]; then
    XDS_SCALE=$(test_bin xds_scale) CA_TEST=$(test_bin ca)
    [ -n "$XDS_SCALE" ] && [ -n "$CA_TEST" ] || die "missing the xds_scale or ca test binary (build without SKIP_BUILD)"
fi

# ---- quiet machine ---------------------------------------------------------
load1() { cut -d' ' -f1 /proc/loadavg; }
if [ "$QUIET_WAIT" -gt 0 ]; then
    waited=0
    while awk -v l="$(load1)" -v m="$QUIET_LOAD" 'BEGIN{exit !(l >= m)}' && [ "$waited" -lt "$QUIET_WAIT" ]; do
        log "load average $(load1) >= $QUIET_LOAD: waiting (${waited}s of ${QUIET_WAIT}s)"
        sleep 30
        waited=$((waited + 30))
    done
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at start: $LOAD_START"

# ---- network ---------------------------------------------------------------
ID="bwperf-$$"
SW="$ID-sw"
CLI="$ID-cli"
SRV="$ID-srv"
WORK=$(mktemp -d /tmp/bwperf.XXXXXX)
PIDS=()
CLI_IP=198.18.0.2
SRV_IP=198.18.0.3
VIP=198.18.100.1

cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.3
    for ns in "$CLI" "$SRV" "$SW"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    for l in "va$$" "vb$$" "vc$$" "vd$$"; do ip link del "$l" 2>/dev/null; done
    if [ "${KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
        echo "run.sh: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}
# Starts a long-running program in a namespace; its pid (ip netns exec
# execs the program, so it is the program's own) goes to PIDS and LAST.
spawn() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
    LAST=$!
    PIDS+=("$LAST")
}
wait_tcp() { # ns host port what
    local i
    for i in $(seq 1 200); do
        if in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$4 did not listen on $2:$3 (logs in $WORK)"
}

log "namespaces $SW (bridge 198.18.0.1/24, CA), $CLI ($CLI_IP), $SRV ($SRV_IP)"
ip netns add "$SW"
in_ns "$SW" ip link set lo up
in_ns "$SW" ip link add br0 type bridge
in_ns "$SW" ip link set br0 address 02:42:c6:12:00:01   # fixed: joining ports must not change the gateway MAC
in_ns "$SW" ip addr add 198.18.0.1/24 dev br0
in_ns "$SW" ip link set br0 up
add_pod() { # ns ip hostside-a hostside-b
    ip netns add "$1"
    ip link add "$3" type veth peer name "$4"
    ip link set "$3" netns "$1"
    ip link set "$4" netns "$SW"
    in_ns "$1" ip link set "$3" name eth0
    in_ns "$1" ip addr add "$2/24" dev eth0
    in_ns "$1" ip link set eth0 up
    in_ns "$1" ip link set lo up
    in_ns "$1" ip route add default via 198.18.0.1
    in_ns "$SW" ip link set "$4" master br0
    in_ns "$SW" ip link set "$4" up
}
add_pod "$CLI" "$CLI_IP" "va$$" "vb$$"
add_pod "$SRV" "$SRV_IP" "vc$$" "vd$$"

# ---- CA and certificates ---------------------------------------------------
TD=cluster.local
spiffe() { echo "spiffe://$TD/ns/default/sa/$1"; }
"$BIN" ca init --dir "$WORK/ca" --trust-domain "$TD" >/dev/null
spawn "$SW" ca "$BIN" ca serve --dir "$WORK/ca" --listen 198.18.0.1:15012
wait_tcp "$SW" 198.18.0.1 15012 "the CA"
token() { "$BIN" ca token --dir "$WORK/ca" --identity "$(spiffe "$1")" --ttl 2h >"$WORK/$1.token"; }
for sa in bench-client bench-server hap-client hap-server; do token "$sa"; done
for sa in hap-client hap-server; do
    in_ns "$SW" "$BIN" cert request --ca 198.18.0.1:15012 --ca-cert "$WORK/ca/bundle.pem" \
        --identity "$(spiffe "$sa")" --token-file "$WORK/$sa.token" --out "$WORK/$sa" >/dev/null
    cat "$WORK/$sa/cert.pem" "$WORK/$sa/key.pem" >"$WORK/$sa.pem"
done
grep -q "BEGIN EC PRIVATE KEY\|BEGIN PRIVATE KEY" "$WORK/hap-client/key.pem" || die "no key from cert request"

# ---- Bulwark config --------------------------------------------------------
cat >"$WORK/mesh.yaml" <<EOF
apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: $TD
  mtls:
    mode: STRICT
  outboundPolicy: REGISTRY_ONLY
---
apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: bench
  namespace: default
spec:
  ports:
    - port: 8080
      name: http
      protocol: http
    - port: 5201
      name: iperf
      protocol: tcp
  identities:
    - $(spiffe bench-server)
  addresses:
    - $VIP
---
apiVersion: bulwark.dev/v1
kind: ServiceEntry
metadata:
  name: bench
  namespace: default
spec:
  location: MESH_INTERNAL
  ports:
    - port: 8080
      name: http
      protocol: http
    - port: 5201
      name: iperf
      protocol: tcp
  endpoints:
    - address: $SRV_IP
      identity: $(spiffe bench-server)
---
apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: bench-callers
  namespace: default
spec:
  service: bench
  rules:
    - from:
        - $(spiffe bench-client)
EOF
"$BIN" xds validate "$WORK/mesh.yaml" >/dev/null 2>"$WORK/validate.log" ||
    { cat "$WORK/validate.log" >&2; die "mesh config invalid"; }
# CONFIG_SOURCE=xds: a control plane in the switch namespace serves mesh.yaml
# over the discovery stream, as in Kubernetes. file: each sidecar reads it.
if [ "$CONFIG_SOURCE" = xds ]; then
    spawn "$SW" xds "$BIN" --access-log off xds serve --config "$WORK/mesh.yaml" \
        --ca-dir "$WORK/ca" --listen 198.18.0.1:15010 --admin-listen 127.0.0.1:15011
    wait_tcp "$SW" 198.18.0.1 15010 "the control plane"
    CONFIG_ARGS=(--xds 198.18.0.1:15010)
else
    CONFIG_ARGS=(--config "$WORK/mesh.yaml")
fi

# Ports kept out of interception: direct app 9090, HAProxy TLS 9443 (http)
# and 5203 (tcp), direct iperf3 5202.
EXCL=9090,9443,5202,5203
for ns in "$CLI" "$SRV"; do
    in_ns "$ns" "$BIN" init --exclude-outbound-ports "$EXCL" \
        --exclude-inbound-ports "15000,15020,15021,$EXCL" >/dev/null
done

# ---- server pod ------------------------------------------------------------
spawn "$SRV" app-8080 "$BIN" demo-app --listen 0.0.0.0:8080 --name bench --body-bytes $BODY
APP_PID=$LAST
spawn "$SRV" app-9090 "$BIN" demo-app --listen 0.0.0.0:9090 --name bench --body-bytes $BODY
APP9090_PID=$LAST
spawn "$SRV" iperf-5201 iperf3 -s -p 5201
spawn "$SRV" iperf-5202 iperf3 -s -p 5202
# HAProxy is configured without logging; the sidecars' per-request access
# log is turned off likewise (BULWARK_ACCESS_LOG=stdout measures it on).
sidecar() { # ns name sa
    spawn "$1" "$2" "$SIDECAR_BIN" --access-log "$BULWARK_ACCESS_LOG" sidecar --identity "$(spiffe "$3")" --ca 198.18.0.1:15012 \
        --ca-cert "$WORK/ca/bundle.pem" --token-file "$WORK/$3.token" "${CONFIG_ARGS[@]}" \
        ${SIDECAR_THREADS:+--worker-threads "$SIDECAR_THREADS"} $SIDECAR_ARGS
}
sidecar "$SRV" sidecar-srv bench-server
SC_SRV=$LAST
sidecar "$CLI" sidecar-cli bench-client
SC_CLI=$LAST

# ---- HAProxy pair ----------------------------------------------------------
HAP_COMMON="global
    nbthread $HAPROXY_THREADS
    maxconn 4096
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s"
cat >"$WORK/haproxy-cli.cfg" <<EOF
$HAP_COMMON
frontend http_out
    mode http
    bind 127.0.0.1:10080
    default_backend to_server
backend to_server
    mode http
    http-reuse always
    server srv $SRV_IP:9443 ssl crt $WORK/hap-client.pem ca-file $WORK/ca/bundle.pem verify required ssl-min-ver TLSv1.3 alpn h2
listen tcp_out
    mode tcp
    bind 127.0.0.1:15201
    server srv $SRV_IP:5203 ssl crt $WORK/hap-client.pem ca-file $WORK/ca/bundle.pem verify required ssl-min-ver TLSv1.3
EOF
cat >"$WORK/haproxy-srv.cfg" <<EOF
$HAP_COMMON
frontend http_in
    mode http
    bind $SRV_IP:9443 ssl crt $WORK/hap-server.pem ca-file $WORK/ca/bundle.pem verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1
    default_backend app
backend app
    mode http
    http-reuse always
    server app 127.0.0.1:9090
listen tcp_in
    mode tcp
    bind $SRV_IP:5203 ssl crt $WORK/hap-server.pem ca-file $WORK/ca/bundle.pem verify required ssl-min-ver TLSv1.3
    server app 127.0.0.1:5202
EOF
for side in cli srv; do haproxy -c -q -f "$WORK/haproxy-$side.cfg" || die "haproxy-$side.cfg invalid"; done
spawn "$SRV" haproxy-srv haproxy -db -f "$WORK/haproxy-srv.cfg"
HAP_SRV=$LAST
spawn "$CLI" haproxy-cli haproxy -db -f "$WORK/haproxy-cli.cfg"
HAP_CLI=$LAST

# ---- readiness -------------------------------------------------------------
wait_tcp "$SRV" 127.0.0.1 8080 "the demo app"
wait_tcp "$SRV" 127.0.0.1 9090 "the demo app"
wait_tcp "$SRV" 127.0.0.1 5201 "iperf3"
wait_tcp "$SRV" 127.0.0.1 5202 "iperf3"
wait_tcp "$CLI" 127.0.0.1 10080 "haproxy (client side)"
for ns_ip in "$SRV:$SRV_IP" "$CLI:$CLI_IP"; do
    ns=${ns_ip%%:*} ip=${ns_ip#*:}
    for i in $(seq 1 300); do
        in_ns "$ns" curl -fs -o /dev/null "http://$ip:15020/healthz/ready" && break
        [ "$i" = 300 ] && die "sidecar in $ns not ready (logs in $WORK)"
        sleep 0.1
    done
done
# RSS of each proxy process, ready but before any request (kB).
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
RSS_IDLE_SC_CLI=$(rss_kb "$SC_CLI") RSS_IDLE_SC_SRV=$(rss_kb "$SC_SRV")
RSS_IDLE_HAP_CLI=$(rss_kb "$HAP_CLI") RSS_IDLE_HAP_SRV=$(rss_kb "$HAP_SRV")
# Where each proxy's idle RSS is: heap and stacks (anonymous) or the
# program's own pages (file).
for p in "sidecar-client:$SC_CLI" "sidecar-server:$SC_SRV" "haproxy-client:$HAP_CLI"; do
    log "idle ${p%%:*}: $(awk '/^(VmRSS|RssAnon|RssFile|Threads):/{printf "%s %s  ", $1, $2}' "/proc/${p#*:}/status")$(awk '/^Pss:/{printf "Pss: %s", $2}' "/proc/${p#*:}/smaps_rollup")"
done
# How often an idle proxy wakes: context switches of all its threads over
# IDLE_WAKE_SECS, before any request (a timer per connection or a polling
# task would show here; every pod pays it).
ctxt() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/{s += $2} END{print s+0}'; }
IDLE_WAKE_SECS=${IDLE_WAKE_SECS:-5}
declare -A WAKE0
for p in "$SC_CLI" "$SC_SRV" "$HAP_CLI" "$HAP_SRV"; do WAKE0[$p]=$(ctxt "$p"); done
sleep "$IDLE_WAKE_SECS" # the measurement window
wakes() { # pid...: the largest rate among them, per second
    for p in "$@"; do echo $(($(ctxt "$p") - ${WAKE0[$p]})); done |
        sort -g | tail -1 | awk -v t="$IDLE_WAKE_SECS" '{printf "%.1f", $1 / t}'
}
WAKE_SC=$(wakes "$SC_CLI" "$SC_SRV") WAKE_HAP=$(wakes "$HAP_CLI" "$HAP_SRV")
log "idle wake-ups per second (larger of each pair): sidecar $WAKE_SC, haproxy $WAKE_HAP"
# READY_HOOK: a command run here, with SC_CLI and SC_SRV (the sidecars'
# PIDs) in its environment: the sidecars have started, answered their
# readiness probes and sat idle, and no request has gone through them. A
# hook that fails ends the run.
if [ -n "${READY_HOOK:-}" ]; then
    SC_CLI=$SC_CLI SC_SRV=$SC_SRV bash -c "$READY_HOOK" || die "READY_HOOK failed"
fi
declare -A URL=([direct]="http://$SRV_IP:9090/" [bulwark]="http://$VIP:8080/" [haproxy]="http://127.0.0.1:10080/")
declare -A IPERF=([direct]="$SRV_IP 5202" [bulwark]="$VIP 5201" [haproxy]="127.0.0.1 15201")
declare -A PROXY_PIDS=([direct]="" [bulwark]="$SC_CLI $SC_SRV" [haproxy]="$HAP_CLI $HAP_SRV")
for s in direct bulwark haproxy; do
    n=$(in_ns "$CLI" curl -fsS --max-time 5 -o /dev/null -w '%{size_download}' "${URL[$s]}") ||
        die "$s: GET ${URL[$s]} failed (logs in $WORK)"
    [ "$n" = "$BODY" ] || die "$s: body of $n bytes, expected $BODY"
    n=$(in_ns "$CLI" curl -fsS --http2-prior-knowledge --max-time 5 -o /dev/null -w '%{size_download}' "${URL[$s]}") ||
        die "$s: h2c GET ${URL[$s]} failed"
done
log "all three paths answer $BODY bytes (HTTP/1.1 and h2c)"

# HOLD=1: keep the set-up running for measurements by hand, until $WORK/stop exists.
if [ "${HOLD:-0}" = 1 ]; then
    {
        echo "CLI=$CLI SRV=$SRV SC_CLI=$SC_CLI SC_SRV=$SC_SRV HAP_CLI=$HAP_CLI HAP_SRV=$HAP_SRV"
        for s in direct bulwark haproxy; do echo "URL_$s=${URL[$s]}"; done
    } >"$WORK/rig.env"
    log "holding: $WORK/rig.env; touch $WORK/stop to end"
    until [ -e "$WORK/stop" ]; do sleep 1; done
    exit 0
fi

# ---- measurements ----------------------------------------------------------
# Results: lines "round setup metric value" in $WORK/results.
RES="$WORK/results"
: >"$RES"
put() { echo "$1 $2 $3 $4" >>"$RES"; }
jnum() { sed -nE "s/.*\"$1\":([-0-9.eE+]+).*/\\1/p"; }
cpu_ticks() { # sum of utime+stime (clock ticks) of the given pids
    local t=0 p
    for p in "$@"; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo $t
}
sys_ticks() { # sum of stime (clock ticks) of the given pids
    local t=0 p
    for p in "$@"; do
        t=$((t + $(awk '{print $15}' "/proc/$p/stat")))
    done
    echo $t
}
HZ=$(getconf CLK_TCK)

loadgen() { # round setup rate
    local r=$1 s=$2 rate=$3 out c0 c1 pids
    pids=${PROXY_PIDS[$s]}
    # shellcheck disable=SC2086
    c0=$(cpu_ticks $pids)
    out=$(in_ns "$CLI" "$LOADGEN" --url "${URL[$s]}" --rate "$rate" --connections "$CONNS" \
        --duration "${LAT_SECS}s" --warmup "${LAT_WARMUP}s" --expect-bytes $BODY)
    # shellcheck disable=SC2086
    c1=$(cpu_ticks $pids)
    echo "$out" >>"$WORK/loadgen.jsonl"
    local k=$((rate / 1000))k
    put "$r" "$s" "p50_$k" "$(echo "$out" | jnum p50_us)"
    put "$r" "$s" "p99_$k" "$(echo "$out" | jnum p99_us)"
    put "$r" "$s" "p999_$k" "$(echo "$out" | jnum p999_us)"
    put "$r" "$s" "err_$k" "$(echo "$out" | jnum errors)"
    if [ -n "$pids" ]; then
        local done_total
        done_total=$(echo "$out" | jnum completed_total)
        # µs of CPU per request per proxy (the pair's total / 2).
        put "$r" "$s" "cpu_$k" "$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v n="$done_total" \
            'BEGIN{printf "%.2f", d / hz * 1e6 / n / 2}')"
    fi
}
wrk_run() {
    local out
    out=$(in_ns "$CLI" wrk -t 1 -c "$WRK_CONNS" -d "${SAT_SECS}s" "${URL[$2]}")
    echo "$out" >>"$WORK/wrk.txt"
    put "$1" "$2" wrk "$(echo "$out" | awk '/^Requests\/sec:/{print $2}')"
}
h2load_run() {
    local out
    out=$(in_ns "$CLI" h2load -t 1 -c "$WRK_CONNS" -m 16 -D "$SAT_SECS" "${URL[$2]}")
    echo "$out" >>"$WORK/h2load.txt"
    echo "$out" | grep -q " 0 failed" || log "h2load $2: some requests failed: $(echo "$out" | grep '^requests:')"
    put "$1" "$2" h2load "$(echo "$out" | sed -nE 's/^finished in [0-9.]+s, ([0-9.]+) req\/s.*/\1/p')"
}
# A new app connection per request; the proxies may keep their own
# connections between them pooled.
close_run() {
    local out
    out=$(in_ns "$CLI" wrk -t 1 -c "$WRK_CONNS" -d "${SAT_SECS}s" -H "Connection: close" "${URL[$2]}")
    echo "$out" >>"$WORK/wrk-close.txt"
    put "$1" "$2" close "$(echo "$out" | awk '/^Requests\/sec:/{print $2}')"
}
# TLS handshakes the server-side sidecar has accepted so far.
srv_handshakes() {
    in_ns "$SRV" curl -fsS --max-time 5 "http://$SRV_IP:15020/metrics" |
        awk '/^bulwark_tls_handshakes_total\{/ && /direction="inbound"/ {s += $NF} END{print s+0}'
}
iperf_run() { # round setup streams
    local out host port
    read -r host port <<<"${IPERF[$2]}"
    out=$(in_ns "$CLI" iperf3 -c "$host" -p "$port" -t "$IPERF_SECS" -P "$3" -f m)
    echo "$out" >>"$WORK/iperf3.txt"
    put "$1" "$2" "iperf_$3" "$(echo "$out" | awk '/receiver/{for(i=1;i<=NF;i++) if($i=="Mbits/sec") v=$(i-1)} END{print v}')"
}

# A short warm-up of every path (connections, pools, JIT-free but caches).
for s in direct bulwark haproxy; do
    in_ns "$CLI" wrk -t 1 -c 4 -d 1s "${URL[$s]}" >/dev/null
done

ORDER=(direct bulwark haproxy)
for r in $(seq 0 $((ROUNDS - 1))); do
    for i in 0 1 2; do
        s=${ORDER[$(((i + r) % 3))]}
        log "round $((r + 1))/$ROUNDS: $s"
        if measuring latency; then
            loadgen "$r" "$s" 1000
            loadgen "$r" "$s" 5000
        fi
        measuring wrk && wrk_run "$r" "$s"
        measuring h2load && h2load_run "$r" "$s"
        if measuring close; then
            if [ "$s" = bulwark ]; then
                hs0=$(srv_handshakes)
                close_run "$r" "$s"
                put "$r" "$s" close_handshakes $(($(srv_handshakes) - hs0))
            else
                close_run "$r" "$s"
            fi
        fi
        if measuring iperf; then
            iperf_run "$r" "$s" 1
            iperf_run "$r" "$s" 4
        fi
    done
done

# ---- memory per idle connection --------------------------------------------
# IDLE_CONNS client connections through the client-side proxy, each after
# one request, held open (tests/perf/idle_conns.py): the client-side
# proxy's RSS growth ÷ connections, in kB.
idle_conns() { # setup pid
    local hp=${URL[$1]#http://} before after ip i
    hp=${hp%%/*}
    before=$(rss_kb "$2")
    rm -f "$WORK/idle.ready"
    in_ns "$CLI" python3 "$ROOT/tests/perf/idle_conns.py" "${hp%:*}" "${hp##*:}" "$IDLE_CONNS" \
        "$WORK/idle.ready" >"$WORK/idle-$1.log" 2>&1 &
    ip=$!
    for i in $(seq 1 600); do
        [ -e "$WORK/idle.ready" ] && break
        kill -0 "$ip" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -e "$WORK/idle.ready" ]; then
        log "idle connections through $1 failed: $(tail -1 "$WORK/idle-$1.log")"
        kill "$ip" 2>/dev/null
        echo nan
        return
    fi
    sleep 1
    after=$(rss_kb "$2")
    kill "$ip" 2>/dev/null
    wait "$ip" 2>/dev/null || true
    awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN{printf "%.2f", (a - b) / n}'
}
CONN_KB_BULWARK=nan CONN_KB_HAPROXY=nan
if measuring memory; then
    log "memory: $IDLE_CONNS idle client connections through each proxy pair"
    CONN_KB_BULWARK=$(idle_conns bulwark "$SC_CLI")
    sleep 1
    CONN_KB_HAPROXY=$(idle_conns haproxy "$HAP_CLI")
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at end: $LOAD_END"

# ---- control plane and CA --------------------------------------------------
# After the data-plane rounds: both tests load the two cores themselves.
CP_P99=nan CP_RSS_KB=nan CP_RSS_MARGIN_KB=nan CA_RATE=nan CA_RATE_NEW_CONN=nan SSL_RATE=nan
if [ "$CONTROL_PLANE" = 1 ]; then
    log "control plane: 1,000 streams ACK a change (tests/perf/xds_scale.rs)"
    "$XDS_SCALE" --ignored --nocapture >"$WORK/xds_scale.txt" 2>&1 ||
        log "xds_scale failed (see $WORK/xds_scale.txt)"
    # The worst push's p99; control-plane RSS with every stream connected.
    CP_P99=$(sed -nE 's/.*p99=([0-9]+)ms.*/\1/p' "$WORK/xds_scale.txt" | sort -g | tail -1)
    CP_RSS_KB=$(sed -nE 's/^control plane RSS with ([0-9]+) streams: ([0-9]+) MiB/\2 \1/p' "$WORK/xds_scale.txt" |
        awk '{printf "%.1f", $1 * 1024 / $2}')
    # What each stream adds above the idle control plane.
    CP_RSS_MARGIN_KB=$(sed -nE 's/.*per stream: ([0-9.]+) kB above idle.*/\1/p' "$WORK/xds_scale.txt")
    log "CA: signatures/s on one core (tests/ca.rs ca_signing_throughput under taskset -c 0)"
    taskset -c 0 "$CA_TEST" --ignored --nocapture ca_signing_throughput \
        >"$WORK/ca_speed.txt" 2>&1 || log "ca_signing_throughput failed (see $WORK/ca_speed.txt)"
    # Signatures per second of the CA process's own CPU, over kept
    # connections and with a new connection (a renewal) per CSR.
    CA_RATE=$(sed -nE 's/mode=kept-connection.*per_core_rate=([0-9]+)\/s.*/\1/p' "$WORK/ca_speed.txt")
    CA_RATE_NEW_CONN=$(sed -nE 's/.*mode=connection-per-csr.*per_core_rate=([0-9]+)\/s.*/\1/p' "$WORK/ca_speed.txt")
    SSL_RATE=$(taskset -c 0 openssl speed -seconds 3 ecdsap256 2>/dev/null |
        awk '/^ *256 bits ecdsa \(nistp256\)/{print $(NF-1)}')
    CP_P99=${CP_P99:-nan} CP_RSS_KB=${CP_RSS_KB:-nan} CP_RSS_MARGIN_KB=${CP_RSS_MARGIN_KB:-nan}
    CA_RATE=${CA_RATE:-nan} CA_RATE_NEW_CONN=${CA_RATE_NEW_CONN:-nan} SSL_RATE=${SSL_RATE:-nan}
fi

# ---- optional profile (not part of the figures) ----------------------------
PROF_MD="$WORK/profile.md"
: >"$PROF_MD"
if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
    log "profiling: syscalls and context switches per request at 5k req/s (perf stat)"
    {
        echo "| proxy pair at 5k req/s | syscalls / request / proxy | context switches / request / proxy |"
        echo "|---|---:|---:|"
    } >>"$PROF_MD"
    for s in bulwark haproxy; do
        pids=${PROXY_PIDS[$s]}
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "${pids// /,}" \
            -o "$WORK/perfstat-$s.csv" -- sleep 6 &
        PS_PID=$!
        out=$(in_ns "$CLI" "$LOADGEN" --url "${URL[$s]}" --rate 5000 --connections "$CONNS" \
            --duration 5s --warmup 0.5s --expect-bytes $BODY)
        wait "$PS_PID" || true
        n=$(echo "$out" | jnum completed_total)
        sc=$(awk -F, '/raw_syscalls/{print $1}' "$WORK/perfstat-$s.csv")
        cs=$(awk -F, '/context-switches/{print $1}' "$WORK/perfstat-$s.csv")
        awk -v s="$s" -v sc="$sc" -v cs="$cs" -v n="$n" \
            'BEGIN{printf "| %s | %.1f | %.2f |\n", s, sc/n/2, cs/n/2}' >>"$PROF_MD"
    done
    # Where the two cores go at saturation: each process's CPU per request,
    # and the proxies' syscalls and context switches per request.
    log "profiling: CPU per request of each process under wrk (saturation)"
    # Heap allocations counted with a uprobe on libc's malloc, where the
    # kernel allows one (HAProxy's own pools bypass it: a floor, for it).
    LIBC=$(ldconfig -p 2>/dev/null | awk '/libc\.so\.6 .*x86-64/ && !f {print $NF; f = 1}' || true)
    PROBE_ADDED=0
    MALLOC_EV=()
    if [ -n "$LIBC" ] && perf probe -q -x "$LIBC" malloc >/dev/null 2>&1; then
        PROBE_ADDED=1
    fi
    if [[ "$(perf probe -l 2>/dev/null)" == *probe_libc:malloc* ]]; then
        MALLOC_EV=(-e probe_libc:malloc)
    fi
    {
        echo
        echo "| pair under wrk -c$WRK_CONNS | req/s | µs CPU / request: client proxy | server proxy | of which kernel (both proxies) | app | wrk | syscalls / request / proxy | context switches / request / proxy | mallocs / request / proxy |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    } >>"$PROF_MD"
    for s in bulwark haproxy; do
        # HAProxy's backend is the app on :9090, the sidecars' the one on :8080.
        read -r p_cli p_srv p_app <<<"$(if [ "$s" = bulwark ]; then echo "$SC_CLI $SC_SRV $APP_PID"; else echo "$HAP_CLI $HAP_SRV $APP9090_PID"; fi)"
        in_ns "$CLI" wrk -t 1 -c "$WRK_CONNS" -d 7s "${URL[$s]}" >"$WORK/wrk-prof-$s.txt" &
        WRK_JOB=$!
        sleep 1
        WRK_PID=$(pgrep -n -x wrk)
        t0=($(cpu_ticks "$p_cli") $(cpu_ticks "$p_srv") $(cpu_ticks "$p_app") $(cpu_ticks "$WRK_PID") $(sys_ticks "$p_cli" "$p_srv"))
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$p_cli,$p_srv" \
            -e 'syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg' \
            -e 'syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_recvfrom,syscalls:sys_enter_recvmsg' \
            -e 'syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex' \
            -o "$WORK/perfstat-sat-$s.csv" -- sleep 5
        t1=($(cpu_ticks "$p_cli") $(cpu_ticks "$p_srv") $(cpu_ticks "$p_app") $(cpu_ticks "$WRK_PID") $(sys_ticks "$p_cli" "$p_srv"))
        wait "$WRK_JOB" || true
        rps=$(awk '/^Requests\/sec:/{print $2}' "$WORK/wrk-prof-$s.txt")
        # Allocations on a run of their own: the uprobe's trap on every
        # malloc would inflate the CPU figures above.
        ma=nan
        if [ ${#MALLOC_EV[@]} -gt 0 ]; then
            # Counted over exactly wrk's run: perf stat runs it.
            perf stat -x, "${MALLOC_EV[@]}" -p "$p_cli,$p_srv" -o "$WORK/perfstat-malloc-$s.csv" -- \
                ip netns exec "$CLI" wrk -t 1 -c "$WRK_CONNS" -d 3s "${URL[$s]}" >"$WORK/wrk-malloc-$s.txt" ||
                log "malloc count under wrk failed"
            nreq=$(awk '/requests in/{print $1}' "$WORK/wrk-malloc-$s.txt")
            # "<not counted>" is not a number: no figure rather than 0.
            ma=$(awk -F, -v n="${nreq:-0}" '/probe_libc:malloc/ && $1 ~ /^[0-9]+$/ {if (n > 0) printf "%.1f", $1 / n / 2}' "$WORK/perfstat-malloc-$s.csv" 2>/dev/null || true)
        fi
        sc=$(awk -F, '/raw_syscalls/{print $1}' "$WORK/perfstat-sat-$s.csv")
        cs=$(awk -F, '/context-switches/{print $1}' "$WORK/perfstat-sat-$s.csv")
        awk -v s="$s" -v rps="$rps" -v hz="$HZ" -v sc="$sc" -v cs="$cs" -v ma="${ma:-nan}" -v k="$((t1[4] - t0[4]))" \
            -v a="$((t1[0] - t0[0]))" -v b="$((t1[1] - t0[1]))" -v c="$((t1[2] - t0[2]))" -v d="$((t1[3] - t0[3]))" \
            'BEGIN{n = rps * 5; u = 1e6 / hz / n
                   m = (ma ~ /^[0-9.]+$/) ? ma : "not measured"
                   printf "| %s | %.0f | %.1f | %.1f | %.0f%% | %.1f | %.1f | %.2f | %.2f | %s |\n", s, rps, a*u, b*u, (a+b > 0) ? 100*k/(a+b) : 0, c*u, d*u, sc/n/2, cs/n/2, m}' >>"$PROF_MD"
    done
    log "profiling both sidecars under wrk (perf record -e cpu-clock -g)"
    in_ns "$CLI" wrk -t 1 -c "$WRK_CONNS" -d 8s "${URL[bulwark]}" >/dev/null &
    WRK_PID=$!
    sleep 1
    perf record -q -e cpu-clock -F 1999 -g -o "$WORK/perf.data" -p "$SC_CLI,$SC_SRV" -- sleep 5 \
        >/dev/null 2>&1 || log "perf record failed"
    wait "$WRK_PID" || true
    tidy() { grep -E '^ +[0-9]' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | cut -c1-150; }
    perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        tidy | head -30 >"$WORK/profile-self.txt" || true
    perf report -i "$WORK/perf.data" --children --sort symbol --stdio -g none 2>/dev/null |
        tidy | head -60 >"$WORK/profile-children.txt" || true
    # The proxy is built without frame pointers: user-space inclusive time
    # needs DWARF unwinding (sampled less often, its stacks are large).
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$WORK/perf-dwarf.data" -p "$SC_CLI,$SC_SRV" -- \
        ip netns exec "$CLI" wrk -t 1 -c "$WRK_CONNS" -d 3s "${URL[bulwark]}" >/dev/null 2>&1 || true
    perf report -i "$WORK/perf-dwarf.data" --children --sort symbol --stdio -g none 2>/dev/null |
        tidy | grep -v '\[k\]' | head -120 >"$WORK/profile-user-children.txt" || true
    {
        echo
        echo "Sidecar pair under wrk, \`perf record -e cpu-clock -g\` (hardware counters are not"
        echo "available in this VM), top self-time symbols:"
        echo
        echo '```'
        head -20 "$WORK/profile-self.txt"
        echo '```'
    } >>"$PROF_MD"
    if [ "$PROBE_ADDED" = 1 ]; then
        perf probe -q -d probe_libc:malloc >/dev/null 2>&1 || true
    fi
fi

# ---- summary ---------------------------------------------------------------
# val SETUP METRIC ROUND
val() { awk -v s="$1" -v m="$2" -v r="$3" '$1==r && $2==s && $3==m {print $4}' "$RES"; }
median() { sort -g | awk '{v[NR]=$1} END{if(NR==0){print "nan"} else if(NR%2){print v[(NR+1)/2]} else {print (v[NR/2]+v[NR/2+1])/2}}'; }
# per-round (a - b) or (a / b), then the median
med_diff() { for r in $(seq 0 $((ROUNDS - 1))); do awk -v a="$(val "$1" "$3" "$r")" -v b="$(val "$2" "$3" "$r")" 'BEGIN{print (a == "" || b == "") ? "nan" : a-b}'; done | median; }
med_ratio() { for r in $(seq 0 $((ROUNDS - 1))); do awk -v a="$(val "$1" "$3" "$r")" -v b="$(val "$2" "$3" "$r")" 'BEGIN{print (b>0)? a/b : "nan"}'; done | median; }
med_val() { for r in $(seq 0 $((ROUNDS - 1))); do val "$1" "$2" "$r"; done | median; }
ms() { awk -v v="$1" 'BEGIN{printf "%+.3f ms", v/1000}'; }
f2() { awk -v v="$1" 'BEGIN{printf "%.2f", v}'; }
# A figure that was not measured (nan, empty: MEASURE left it out) is
# neither PASS nor FAIL.
verdict() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN{num = (v ~ /^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$/); ok = num && ((op=="le") ? (v+0 <= t+0) : (v+0 >= t+0)); print !num ? "not measured" : ok ? "PASS" : "FAIL"}'; }

TABLE="$WORK/table.md"
# The targets are issue #7's, each a ratio or bound judged on this run.
both() { awk -v a="$1" -v b="$2" 'BEGIN{print (a=="PASS" && b=="PASS") ? "PASS" : (a=="not measured" || b=="not measured") ? "not measured" : "FAIL"}'; }
mb() { awk -v v="$1" 'BEGIN{printf "%.1f MB", v/1024}'; }
{
    echo "| metric | Bulwark | HAProxy | target (issue #7) | result |"
    echo "|---|---:|---:|---|:---:|"
    for k in 1k 5k; do
        for q in p50 p99 p999; do
            b=$(med_diff bulwark direct "${q}_$k")
            h=$(med_diff haproxy direct "${q}_$k")
            case "$k/$q" in
            1k/p50 | 1k/p99)
                lim=$(awk -v h="$h" 'BEGIN{print 0.7 * h}')
                tgt="≤ 0.7 × HAProxy's ($(ms "$lim"))" res=$(verdict "$b" le "$lim")
                ;;
            *) tgt="—" res="info" ;;
            esac
            qn=${q/p999/p99.9}
            echo "| added $qn latency at $k req/s (direct $(awk -v v="$(med_val direct "${q}_$k")" 'BEGIN{printf "%.3f", v/1000}') ms) | $(ms "$b") | $(ms "$h") | $tgt | $res |"
        done
    done
    b=$(med_ratio bulwark direct wrk)
    h=$(med_ratio haproxy direct wrk)
    bh=$(med_ratio bulwark haproxy wrk)
    echo "| HTTP/1.1 saturation, wrk keep-alive, × direct (direct $(f2 "$(med_val direct wrk)") req/s) | $(f2 "$b") | $(f2 "$h") | ≥ 0.35 × direct and ≥ 1.3 × HAProxy (is $(f2 "$bh")) | $(both "$(verdict "$b" ge 0.35)" "$(verdict "$bh" ge 1.3)") |"
    b=$(med_ratio bulwark direct h2load)
    h=$(med_ratio haproxy direct h2load)
    bh=$(med_ratio bulwark haproxy h2load)
    echo "| HTTP/2 saturation, h2load $WRK_CONNS conns × 16 streams, × direct (direct $(f2 "$(med_val direct h2load)") req/s) | $(f2 "$b") | $(f2 "$h") | ≥ 1.3 × HAProxy (is $(f2 "$bh")) | $(verdict "$bh" ge 1.3) |"
    b=$(med_val bulwark cpu_5k)
    h=$(med_val haproxy cpu_5k)
    echo "| CPU per request per proxy at 5k req/s | $(f2 "$b") µs | $(f2 "$h") µs | ≤ 10 µs | $(verdict "$b" le 10) |"
    b=$(med_val bulwark cpu_1k)
    h=$(med_val haproxy cpu_1k)
    echo "| CPU per request per proxy at 1k req/s | $(f2 "$b") µs | $(f2 "$h") µs | — | info |"
    b=$(med_ratio bulwark direct close)
    h=$(med_ratio haproxy direct close)
    bh=$(med_ratio bulwark haproxy close)
    hs=$(for r in $(seq 0 $((ROUNDS - 1))); do val bulwark close_handshakes "$r"; done | awk '{s += $1} END{print s+0}')
    echo "| new app connection per request (wrk \`Connection: close\`), × direct (direct $(f2 "$(med_val direct close)") req/s) | $(f2 "$b") | $(f2 "$h") | ≥ HAProxy (is $(f2 "$bh")), no new sidecar-to-sidecar TLS handshake (were $hs) | $(both "$(verdict "$bh" ge 1.0)" "$(verdict "$hs" le 0)") |"
    for n in 1 4; do
        b=$(med_ratio bulwark direct "iperf_$n")
        h=$(med_ratio haproxy direct "iperf_$n")
        bh=$(med_ratio bulwark haproxy "iperf_$n")
        echo "| bulk TCP, iperf3 $n stream(s), × direct (direct $(f2 "$(med_val direct "iperf_$n")") Mbit/s) | $(f2 "$b") | $(f2 "$h") | ≥ HAProxy (is $(f2 "$bh")) | $(verdict "$bh" ge 1.0) |"
    done
    b=$(printf '%s\n' "$RSS_IDLE_SC_CLI" "$RSS_IDLE_SC_SRV" | sort -g | tail -1)
    h=$(printf '%s\n' "$RSS_IDLE_HAP_CLI" "$RSS_IDLE_HAP_SRV" | sort -g | tail -1)
    echo "| RSS idle per proxy (larger of the pair) | $(mb "$b") | $(mb "$h") | ≤ 8 MB | $(verdict "$b" le 8192) |"
    echo "| wake-ups per second of an idle proxy (larger of the pair, ${IDLE_WAKE_SECS} s before any request) | $WAKE_SC | $WAKE_HAP | — | info |"
    echo "| RSS per idle client connection ($IDLE_CONNS, client-side proxy) | $(f2 "$CONN_KB_BULWARK") kB | $(f2 "$CONN_KB_HAPROXY") kB | ≤ 10 kB | $(verdict "$CONN_KB_BULWARK" le 10) |"
    if [ "$CONTROL_PLANE" = 1 ]; then
        echo "| control plane: 1,000 streams ACK a change, p99 (worst of 3 pushes) | $CP_P99 ms | — | < 500 ms | $(awk -v v="$CP_P99" 'BEGIN{print (v+0 == v && v < 500) ? "PASS" : "FAIL"}') |"
        echo "| control plane: RSS per connected sidecar (above the idle control plane ÷ 1,000) | $CP_RSS_MARGIN_KB kB | — | ≤ 50 kB | $(verdict "$CP_RSS_MARGIN_KB" le 50) |"
        echo "| control plane: RSS per connected sidecar (total ÷ 1,000) | $CP_RSS_KB kB | — | — | info |"
        ca=$(awk -v a="$CA_RATE" -v b="$SSL_RATE" 'BEGIN{print (b > 0) ? a / b : "nan"}')
        ca_new=$(awk -v a="$CA_RATE_NEW_CONN" -v b="$SSL_RATE" 'BEGIN{print (b > 0) ? a / b : "nan"}')
        echo "| CA: CSRs signed per second of CA CPU (one core), kept connections, ÷ \`openssl speed ecdsap256\` signs/s ($SSL_RATE) | $CA_RATE/s ($(awk -v v="$ca" 'BEGIN{printf "%.3f", v}')) | — | ≥ 0.1 | $(verdict "$ca" ge 0.1) |"
        echo "| CA: the same with a new mTLS connection per CSR (a sidecar's renewal) | $CA_RATE_NEW_CONN/s ($(awk -v v="$ca_new" 'BEGIN{printf "%.3f", v}')) | — | — | info |"
    fi
} >"$TABLE"

ERRS=$(awk '$3 ~ /^err_/ {s += $4} END{print s+0}' "$RES")
RAW="$WORK/raw.md"
{
    echo "| round | setup | p50 1k | p99 1k | p99.9 1k | p50 5k | p99 5k | p99.9 5k | CPU/req 5k | wrk req/s | h2load req/s | wrk close req/s | iperf3 ×1 | iperf3 ×4 |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for r in $(seq 0 $((ROUNDS - 1))); do
        for s in direct bulwark haproxy; do
            us() { awk -v v="$(val "$s" "$1" "$r")" 'BEGIN{printf "%.0f µs", v}'; }
            cpu=$(val "$s" cpu_5k "$r")
            echo "| $r | $s | $(us p50_1k) | $(us p99_1k) | $(us p999_1k) | $(us p50_5k) | $(us p99_5k) | $(us p999_5k) | ${cpu:+$cpu µs} | $(val "$s" wrk "$r") | $(val "$s" h2load "$r") | $(val "$s" close "$r") | $(val "$s" iperf_1 "$r") Mbit/s | $(val "$s" iperf_4 "$r") Mbit/s |"
        done
    done
} >"$RAW"

DATE=$(date -u +%Y-%m-%dT%H:%MZ)
MACHINE="$(nproc)-core $(uname -m), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)"
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) && { git -C "$ROOT" diff --quiet HEAD || REV="$REV+changes"; } || REV="${BULWARK_REV:-unknown}"
VERSIONS="bulwark $REV, $(rustc --version 2>/dev/null | cut -d' ' -f1-2), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), h2load $(h2load --version | awk '{print $NF}'), $(iperf3 --version | head -1 | cut -d' ' -f1-2)"
SECTION="$WORK/section.md"
{
    echo
    echo "## Bulwark vs HAProxy vs direct (\`tests/perf/run.sh\`)"
    echo
    echo "Run $DATE on $MACHINE. Versions: $VERSIONS."
    echo "Load average (1/5/15 min) at start $LOAD_START, at end $LOAD_END."
    [ -n "${ORDER_FOUND:-}" ] && echo "Hot-text layout (build.rs): $ORDER_FOUND listed functions in the program."
    echo
    echo "Pods are network namespaces (client pod $CLI_IP, server pod $SRV_IP) on a bridge in a switch"
    echo "namespace that also runs the Bulwark CA. Backend: \`bulwark demo-app --body-bytes $BODY\` in the"
    echo "server pod. Set-ups: direct (client → server:9090, a port excluded from interception);"
    echo "Bulwark (client → VIP $VIP:8080 \`protocol: http\` / :5201 \`protocol: tcp\` → client sidecar →"
    echo "mTLS, pooled HTTP/2 → server sidecar → app); HAProxy $(haproxy -v | head -1 | cut -d' ' -f3) pair (client → 127.0.0.1:10080,"
    echo "\`mode http\`, \`http-reuse always\`, TLS 1.3 + ALPN h2 with a client certificate → server-side"
    echo "HAProxy \`verify required\` → app; iperf3 through \`mode tcp\` with ssl on both sides). All"
    echo "certificates are ECDSA P-256 SVIDs from the same \`bulwark ca\` (\`bulwark cert request\` for HAProxy)."
    echo "$ROUNDS interleaved rounds (the order of the set-ups rotates); every figure is the median over rounds"
    echo "of the per-round difference (latency) or ratio (throughput) against direct."
    echo "Latency: \`loadgen\` (tests/perf/loadgen.rs), open loop at a fixed rate, $CONNS HTTP/1.1 keep-alive"
    echo "connections, ${LAT_SECS} s measured after ${LAT_WARMUP} s warm-up, latency from each request's scheduled"
    echo "send time (coordinated-omission safe). Saturation: wrk -t1 -c$WRK_CONNS, h2load -t1 -c$WRK_CONNS -m16,"
    echo "${SAT_SECS} s each. CPU: utime+stime of both proxy processes during the 5k req/s run, ÷ requests ÷ 2."
    echo "\`Connection: close\`: wrk -t1 -c$WRK_CONNS with that header, ${SAT_SECS} s; TLS handshakes counted on the server"
    echo "sidecar's \`bulwark_tls_handshakes_total{direction=\"inbound\"}\` before and after."
    echo "Memory: VmRSS of each proxy once ready, before any request; then $IDLE_CONNS client connections"
    echo "(tests/perf/idle_conns.py, one request each, then idle) through each pair, the client-side proxy's"
    echo "RSS growth ÷ $IDLE_CONNS."
    if [ "$CONTROL_PLANE" = 1 ]; then
        echo "Control plane: \`cargo test --release --test xds_scale -- --ignored\` (1,000 mTLS streams, 3 pushes);"
        echo "RSS per sidecar is the control plane's RSS with every stream connected minus its RSS before any, ÷ 1,000."
        echo "CA: \`taskset -c 0 cargo test --release --test ca -- --ignored ca_signing_throughput\` (the CA and its"
        echo "8 clients share core 0): CSRs signed per second of the CA process's own CPU (user + system), over kept"
        echo "connections and with a new connection per CSR, against \`taskset -c 0 openssl speed -seconds 3 ecdsap256\`."
    fi
    echo "iperf3: ${IPERF_SECS} s. Sidecars run with \`--access-log $BULWARK_ACCESS_LOG\` (HAProxy has no \`log\` line),"
    echo "${SIDECAR_THREADS:-the default number of} worker thread(s) each${SIDECAR_ARGS:+, and \`$SIDECAR_ARGS\`}; HAProxy with \`nbthread $HAPROXY_THREADS\`."
    echo "The sidecars' config: $([ "$CONFIG_SOURCE" = xds ] && echo "from a control plane (\`bulwark xds serve\` in the switch namespace)" || echo "read from mesh.yaml (\`--config\`)")."
    echo "Everything (load generator, both proxies, app) shares the same 2 cores."
    echo "Failed or wrong-size requests during latency runs: $ERRS."
    echo
    cat "$TABLE"
    echo
    echo "<details><summary>per-round figures</summary>"
    echo
    cat "$RAW"
    echo
    echo "</details>"
    if [ -s "$PROF_MD" ]; then
        echo
        cat "$PROF_MD"
    fi
} >"$SECTION"

echo
cat "$TABLE"
echo
cat "$RAW"
if [ -s "$PROF_MD" ]; then
    cat "$PROF_MD"
    echo
    echo "(inclusive-time profiles: $WORK/profile-children.txt, $WORK/profile-user-children.txt with KEEP=1)"
fi
echo
echo "load average at start: $LOAD_START; at end: $LOAD_END; failed requests: $ERRS; $(($(date +%s) - T0)) s"
if [ "$RECORD" = 1 ]; then
    cat "$SECTION" >>"$ROOT/tests/perf/RESULTS.md"
    log "appended to tests/perf/RESULTS.md"
fi
