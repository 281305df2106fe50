#!/usr/bin/env bash
# Starts N agents (default 100) on loopback with the LAN profile, each registering one service,
# waits until one of them sees all N alive, lets gossip run for SETTLE seconds (default 30),
# then prints the agents' resident memory (VmRSS: min / median / max) and one agent's
# traffic counters. Every agent is stopped on exit.
#   usage: scripts/agent-memory.sh [N]      (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
SETTLE=${SETTLE:-30}
BASE_PORT=${BASE_PORT:-17000}
cargo build --release --quiet --bin grapevine
BIN=target/release/grapevine
LOGS=$(mktemp -d)
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
  sleep 2
  [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null || true
  rm -rf "$LOGS"
}
trap cleanup EXIT
for i in $(seq 0 $((N - 1))); do
  join=()
  [ "$i" -gt 0 ] && join=(--join "127.0.0.1:$BASE_PORT")
  RUST_LOG=warn "$BIN" agent --name "n$i" --bind "127.0.0.1:$((BASE_PORT + i))" "${join[@]}" \
    --service "svc$((i % 10)):$((BASE_PORT + 10000 + i))" --no-check >"$LOGS/n$i.log" 2>&1 &
  pids+=($!)
done
observer="127.0.0.1:$((BASE_PORT + N / 2))"
start=$(date +%s%N)
for _ in $(seq 1 240); do
  alive=$("$BIN" members --agent "$observer" --json 2>/dev/null |
    python3 -c 'import json,sys; print(sum(m["status"] == "alive" for m in json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$alive" = "$N" ] && break
  sleep 0.5
done
[ "$alive" = "$N" ] || { echo "only $alive of $N alive after 120 s" >&2; exit 1; }
echo "all $N agents alive after $((($(date +%s%N) - start) / 1000000)) ms (seen from $observer)"
sleep "$SETTLE"
for p in "${pids[@]}"; do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | sort -n |
  awk '{v[NR] = $1} END {printf "VmRSS of %d agents: min %.1f MB, median %.1f MB, max %.1f MB\n", NR, v[1]/1024, v[int((NR+1)/2)]/1024, v[NR]/1024}'
"$BIN" info --agent "$observer"
