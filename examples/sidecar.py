#!/usr/bin/env python3
"""A service in Python using a grapevine agent as its sidecar, with the standard library only.

Start an agent with its HTTP API, then run this script against it:

    grapevine agent --name a --bind 127.0.0.1:7946 --http 127.0.0.1:8500
    python3 examples/sidecar.py --url http://127.0.0.1:8500

It speaks Consul's HTTP API: registers a service with a TTL check and reports in, looks the
service up (passing instances only), writes a KV key and watches it with a blocking query
while another thread changes it. Exits non-zero if any step does not behave as documented.
"""

import argparse
import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request

TIMEOUT = 30  # seconds; every request is bounded


def call(base, method, path, body=None):
    """One request; returns (status, headers, decoded JSON or raw bytes)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    kind = headers.get("Content-Type", "")
    return status, headers, json.loads(raw) if kind.startswith("application/json") else raw


def expect(condition, message):
    if not condition:
        print("FAILED:", message, file=sys.stderr)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8500", help="the agent's HTTP API")
    base = parser.parse_args().url.rstrip("/")

    # 1. Register an instance whose health is a TTL check (Consul's registration body):
    # critical until we report in.
    registration = {
        "Name": "py-greeter",
        "ID": "py-greeter-1",
        "Port": 7000,
        "Tags": ["python", "v1"],
        "Meta": {"lang": "python"},
        "Check": {"TTL": "15s"},
    }
    status, _, body = call(base, "PUT", "/v1/agent/service/register", registration)
    expect(status == 200, f"register: {status} {body}")
    status, _, checks = call(base, "GET", "/v1/agent/checks")
    check = checks["service:py-greeter-1"]
    print(f"registered py-greeter-1 (check {check['CheckID']}: {check['Status']})")
    status, _, body = call(base, "PUT", "/v1/agent/check/pass/service:py-greeter-1?note=ready")
    expect(status == 200, f"check pass: {status} {body}")

    # 2. Look it up: passing instances carrying the tag `python`.
    status, headers, entries = call(
        base, "GET", "/v1/health/service/py-greeter?passing&tag=python"
    )
    expect(status == 200 and len(entries) == 1, f"lookup: {status} {entries}")
    service, node = entries[0]["Service"], entries[0]["Node"]
    print(
        f"found 1 passing instance: {service['ID']} at {service['Address']}:{service['Port']}"
        f" on node {node['Node']} (index {headers['X-Consul-Index']})"
    )

    # A bad request gets a 400 whose plain-text body says why.
    status, _, body = call(base, "PUT", "/v1/agent/service/register", {"Port": 1})
    expect(status == 400 and b"name" in body, f"bad register: {status} {body}")

    # 3. Write a config key, then watch it with a blocking query while a thread changes it.
    key = "/v1/kv/demo/sidecar/greeting"
    status, _, body = call(base, "PUT", key, b"hello from python")
    expect(status == 200 and body is True, f"kv put: {status} {body}")
    status, headers, body = call(base, "GET", key)
    value = base64.b64decode(body[0]["Value"]).decode()
    expect(status == 200 and value == "hello from python", f"kv get: {body}")
    index = int(headers["X-Consul-Index"])

    def change_later():
        time.sleep(0.5)
        call(base, "PUT", key, b"hello from python, again")

    writer = threading.Thread(target=change_later)
    writer.start()
    started = time.monotonic()
    status, headers, body = call(base, "GET", f"{key}?index={index}&wait=20s")
    waited = time.monotonic() - started
    writer.join()
    value = base64.b64decode(body[0]["Value"]).decode()
    expect(status == 200 and value == "hello from python, again", f"watch: {body}")
    expect(int(headers["X-Consul-Index"]) > index, "the index did not move")
    print(f"watch saw {value!r} after {waited:.2f} s (index {index} -> "
          f"{headers['X-Consul-Index']})")

    # 4. Clean up the service (the key stays, for whoever reads it next).
    status, _, body = call(base, "PUT", "/v1/agent/service/deregister/py-greeter-1")
    expect(status == 200, f"deregister: {status} {body}")
    print("deregistered py-greeter-1")


if __name__ == "__main__":
    main()
