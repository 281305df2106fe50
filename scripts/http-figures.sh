#!/usr/bin/env bash
# Figures of the Consul-compatible HTTP API: lookup latency p50/p99 of
# `GET /v1/health/service/web` and `GET /v1/kv/app/config/limit` with a keep-alive client
# (Python's http.client, one connection, REQUESTS each, after a warm-up), then requests/s
# with wrk (Debian) on one connection (a native keep-alive client's latency) and at 64
# connections, 2 threads, DURATION s per endpoint, and the agent's
# RSS after the run. The agent is one of a 3-agent loopback cluster (release build) holding
# 3 instances of `web` (one per agent) and 100 KV keys.
#   usage: scripts/http-figures.sh          (needs wrk: apt-get install wrk)
#          BIN=/path/to/release/grapevine scripts/http-figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-5000}
DURATION=${DURATION:-10}
command -v wrk >/dev/null || { echo "error: wrk is needed (apt-get install wrk)" >&2; exit 1; }
# BIN=path/to/grapevine uses a release binary built elsewhere instead of building one.
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin grapevine
  BIN=target/release/grapevine
fi
LOGS=$(mktemp -d)
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$LOGS"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SEED=""
APIS=()
for name in a b c; do
  gossip=$(free_port); api=$(free_port)
  join=()
  [ -n "$SEED" ] && join=(--join "$SEED")
  RUST_LOG=warn "$BIN" agent --name "$name" --profile local --bind "127.0.0.1:$gossip" \
    --http "127.0.0.1:$api" "${join[@]}" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
  SEED=${SEED:-127.0.0.1:$gossip}
  APIS+=("$api")
done
A=${APIS[0]}
python3 - "${APIS[@]}" <<'PY'
import json, sys, time, urllib.request
apis = sys.argv[1:]
def call(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()
for _ in range(100):
    try:
        members = json.loads(call(apis[0], "GET", "/v1/agent/members"))
        if sum(m["Status"] == 1 for m in members) == 3:
            break
    except OSError:
        pass
    time.sleep(0.1)
for i, port in enumerate(apis):
    body = json.dumps({"Name": "web", "ID": f"web-{i}", "Port": 8080 + i, "Tags": ["v1"]})
    call(port, "PUT", "/v1/agent/service/register", body.encode())
for i in range(100):
    call(apis[0], "PUT", f"/v1/kv/app/config/key{i}", b"v" * 64)
call(apis[0], "PUT", "/v1/kv/app/config/limit", b"100")
for _ in range(100):
    if len(json.loads(call(apis[0], "GET", "/v1/health/service/web"))) == 3:
        break
    time.sleep(0.1)
PY
echo "machine: $(nproc) cores, shared with other builds; agent a of 3, release build"
python3 - "$A" "$REQUESTS" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for path in ["/v1/health/service/web", "/v1/kv/app/config/limit"]:
    times = []
    for i in range(n + 500):
        started = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        took = time.perf_counter() - started
        assert response.status == 200, response.status
        if i >= 500:
            times.append(took)
    times.sort()
    p = lambda q: times[int(q * (len(times) - 1))] * 1e6
    print(f"keep-alive GET {path}: p50 {p(0.50):.0f} us, p99 {p(0.99):.0f} us ({n} requests, Python client)")
PY
# The same latency with a native keep-alive client: wrk on one connection, one thread.
for path in /v1/health/service/web /v1/kv/app/config/limit; do
  echo "wrk -t1 -c1 -d${DURATION}s --latency http://127.0.0.1:$A$path"
  wrk -t1 -c1 -d"${DURATION}s" --latency "http://127.0.0.1:$A$path" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
done
for path in /v1/health/service/web /v1/kv/app/config/limit; do
  echo "wrk -t2 -c64 -d${DURATION}s http://127.0.0.1:$A$path"
  wrk -t2 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$A$path" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
done
rss=$(awk '/VmRSS/ {print $2}' "/proc/${pids[0]}/status")
echo "agent a RSS after the run: $((rss / 1024)) MiB ($rss kB)"
