#!/usr/bin/env bash
# Queries per second and latency of the DNS interface: one agent (release build, LAN
# profile) with 100 services, two instances each (NAME.service.consul has 2 A records and
# 2 SRV records with their addresses), asked by dnsperf (Debian's, installed if missing)
# with a mix of A and SRV queries over UDP at the highest rate the pair reaches. Prints
# dnsperf's summary, p50/p90/p99/max latency (from dnsperf -v, one line per answer), and
# the agent's RSS and CPU during the run. The agent is stopped on exit.
#   usage: scripts/dns-perf.sh [SECONDS]      (default 15)
#   env:   CLIENTS (dnsperf -c, default 4), OUTSTANDING (-q, default 100), MODE (udp|tcp)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-15}
CLIENTS=${CLIENTS:-4}
OUTSTANDING=${OUTSTANDING:-100}
MODE=${MODE:-udp}
if ! command -v dnsperf >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dnsperf >/dev/null
fi
cargo build --release --quiet --bin grapevine
BIN=target/release/grapevine
work=$(mktemp -d)
agent=""
cleanup() {
    [ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null && { wait "$agent"; } 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
GOSSIP=$(free_port)
DNS_PORT=$(free_port)
services=()
for i in $(seq 0 99); do
    services+=(--service "svc$i:$((20000 + i))" --service "svc$i:$((21000 + i))")
done
RUST_LOG=warn "$BIN" agent --name perf --bind "127.0.0.1:$GOSSIP" --no-check "${services[@]}" \
    --dns "127.0.0.1:$DNS_PORT" >"$work/agent.log" 2>&1 &
agent=$!
for _ in $(seq 1 100); do
    [ "$(dig @127.0.0.1 -p "$DNS_PORT" +short +time=1 +tries=1 svc99.service.consul SRV | wc -l)" = 2 ] && break
    sleep 0.1
done
[ "$(dig @127.0.0.1 -p "$DNS_PORT" +short svc99.service.consul SRV | wc -l)" = 2 ] \
    || { echo "agent not answering" >&2; cat "$work/agent.log" >&2; exit 1; }

for i in $(seq 0 99); do
    echo "svc$i.service.consul A"
    echo "_svc$i._tcp.service.consul SRV"
done >"$work/queries"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
ticks_per_s=$(getconf CLK_TCK)
before=$(cpu_ticks)
start_ns=$(date +%s%N)
dnsperf -m "$MODE" -s 127.0.0.1 -p "$DNS_PORT" -d "$work/queries" -l "$SECONDS_RUN" \
    -c "$CLIENTS" -q "$OUTSTANDING" -v >"$work/dnsperf.out" 2>&1 || true
end_ns=$(date +%s%N)
after=$(cpu_ticks)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")

echo "== dnsperf ($MODE, $CLIENTS clients, $OUTSTANDING outstanding, ${SECONDS_RUN} s; 100 services x 2 instances, A and SRV)"
grep -vE '^> ' "$work/dnsperf.out" | sed -n '/Statistics:/,$p'
echo "== latency of every answer (dnsperf -v)"
grep -E '^> ' "$work/dnsperf.out" | awk '{print $NF}' | python3 -c '
import sys
xs = sorted(float(x) for x in sys.stdin if x.strip())
if not xs:
    sys.exit("no answers")
q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1e6
print(f"answers {len(xs)}: p50 {q(0.5):.0f} us, p90 {q(0.9):.0f} us, p99 {q(0.99):.0f} us, max {xs[-1] * 1e6:.0f} us")
'
python3 - "$before" "$after" "$start_ns" "$end_ns" "$ticks_per_s" "$rss" "$hwm" <<'PY'
import sys
before, after, start, end, hz, rss, hwm = map(int, sys.argv[1:])
wall = (end - start) / 1e9
cpu = (after - before) / hz
print(f"== agent: CPU {cpu:.1f} s in {wall:.1f} s ({100 * cpu / wall:.0f} % of one core), "
      f"RSS {rss / 1024:.1f} MB at the end, peak {hwm / 1024:.1f} MB")
PY
