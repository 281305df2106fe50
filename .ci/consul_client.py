#!/usr/bin/env python3
"""A real Consul client (py-consul from PyPI, used as its documentation shows) against a
three-agent grapevine cluster on loopback. Called by .ci/consul; exits non-zero on the first
call that does not behave as against Consul.

    python3 .ci/consul_client.py target/debug/grapevine
"""

import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import consul

TOKEN = "ci-secret-token"
DEADLINE = 60  # seconds for the whole run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, condition, within=15.0):
    started, last = time.monotonic(), None
    while time.monotonic() - started < within:
        try:
            if condition():
                return time.monotonic() - started
        except Exception as error:  # not up yet: connection refused, 404...
            last = error
        time.sleep(0.1)
    print(f"FAILED: {what} (waited {within} s; last error {last!r})", file=sys.stderr)
    sys.exit(1)


def expect(condition, message):
    if not condition:
        print("FAILED:", message, file=sys.stderr)
        sys.exit(1)


class Healthy(http.server.BaseHTTPRequestHandler):
    """The target of an HTTP check: 200 on /ok, 429 on /busy, 500 elsewhere."""

    def do_GET(self):
        code = {"/ok": 200, "/busy": 429}.get(self.path, 500)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    binary = sys.argv[1]
    signal.alarm(DEADLINE)
    logs = tempfile.mkdtemp(prefix="grapevine-consul-")
    agents = {}
    seed = None
    for name in ["a", "b", "c"]:
        gossip, api = free_port(), free_port()
        args = [binary, "agent", "--name", name, "--profile", "local",
                "--bind", f"127.0.0.1:{gossip}", "--http", f"127.0.0.1:{api}"]
        # Agent a requires a token; py-consul sends it on most calls but not all (agent.self,
        # members, status, datacenters), so those are asked of b and c.
        if name == "a":
            args += ["--http-token", TOKEN]
        if seed:
            args += ["--join", seed]
        seed = seed or f"127.0.0.1:{gossip}"
        log = open(os.path.join(logs, f"{name}.log"), "w")
        agents[name] = (subprocess.Popen(args, stdout=log, stderr=log), api)
    try:
        run({name: consul.Consul(host="127.0.0.1", port=api, token=TOKEN if name == "a" else None)
             for name, (_, api) in agents.items()}, agents)
    finally:
        for process, _ in agents.values():
            if process.poll() is None:
                process.terminate()
        for process, _ in agents.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    print("py-consul: every call behaved as against Consul")


def run(clients, agents):
    a, b = clients["a"], clients["b"]
    wait_for("agents up", lambda: a.agent.services() is not None and b.agent.self() is not None)

    # Tokens: none or a wrong one is refused with 403 (py-consul raises ACLPermissionDenied).
    for bad in [consul.Consul(host="127.0.0.1", port=agents["a"][1]),
                consul.Consul(host="127.0.0.1", port=agents["a"][1], token="wrong")]:
        try:
            bad.agent.services()
            expect(False, "a request without the token was answered")
        except consul.ACLPermissionDenied:
            pass

    me = b.agent.self()
    expect(me["Config"]["NodeName"] == "b", f"self: {me['Config']}")
    dc = me["Config"]["Datacenter"]
    expect(b.catalog.datacenters() == [dc], "datacenters")
    wait_for("three members", lambda: sorted(m["Name"] for m in b.agent.members()
                                             if m["Status"] == 1) == ["a", "b", "c"])
    expect(b.status.leader() != "", "status leader")
    expect(len(b.status.peers()) == 1, "status peers")

    # A service with a TTL check (critical until it reports in), as py-consul documents.
    expect(a.agent.service.register("web", service_id="web-1", port=8080,
                                    tags=["v1", "eu"], meta={"team": "core"},
                                    check=consul.Check.ttl("30s")), "register web-1")
    checks = a.agent.checks()
    expect(checks["service:web-1"]["Status"] == "critical", f"ttl starts critical: {checks}")
    expect(a.agent.check.ttl_pass("service:web-1", notes="warmed up"), "ttl pass")
    expect(a.agent.checks()["service:web-1"]["Output"] == "warmed up", "ttl note kept")
    services = a.agent.services()
    expect(services["web-1"]["Service"] == "web" and services["web-1"]["Port"] == 8080,
           f"agent services: {services}")

    # Seen from agent b, through gossip: catalog and health.
    _, passing = wait_for_entries(b, "web", passing=True, count=1)
    entry = passing[0]
    expect(entry["Service"]["ID"] == "web-1" and entry["Node"]["Node"] == "a", f"entry {entry}")
    expect({c["CheckID"] for c in entry["Checks"]} == {"serfHealth", "service:web-1"},
           f"checks {entry['Checks']}")
    index, services = b.catalog.services()
    expect(services.get("web") == ["eu", "v1"], f"catalog services {services}")
    _, nodes = b.catalog.service("web", tag="eu")
    expect([n["ServiceID"] for n in nodes] == ["web-1"], f"catalog service {nodes}")
    _, nodes = b.catalog.nodes()
    expect(sorted(n["Node"] for n in nodes) == ["a", "b", "c"], f"nodes {nodes}")
    _, node = b.catalog.node("a")
    expect("web-1" in node["Services"], f"catalog node {node}")
    _, checks = b.health.checks("web")
    expect([c["Status"] for c in checks] == ["passing"], f"health checks {checks}")
    _, checks = b.health.node("c")
    expect([c["CheckID"] for c in checks] == ["serfHealth"], f"health node {checks}")
    _, checks = b.health.state("critical")
    expect(checks == [], f"nothing critical yet: {checks}")

    # A blocking query on b wakes when a new instance registers on c.
    index, _ = b.health.service("web")
    started = time.monotonic()
    def register_later():
        time.sleep(0.5)
        clients["c"].agent.service.register("web", service_id="web-2", port=8081,
                                            tags=["v2"])
    writer = threading.Thread(target=register_later)
    writer.start()
    new_index, entries = b.health.service("web", index=index, wait="20s")
    writer.join()
    waited = time.monotonic() - started
    expect(int(new_index) > int(index), "index moved")
    if len(entries) < 2:
        _, entries = wait_for_entries(b, "web", passing=False, count=2)
    print(f"blocking health query saw web-2 after {waited:.2f} s")

    # HTTP checks: 2xx passing, 429 warning, anything else critical.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    for path, status in [("/ok", "passing"), ("/busy", "warning"), ("/broken", "critical")]:
        a.agent.service.register("api", service_id=f"api{path.replace('/', '-')}", port=port,
                                 check=consul.Check.http(f"http://127.0.0.1:{port}{path}",
                                                         interval="1s", timeout="1s"))
        check = a.agent.checks()[f"service:api{path.replace('/', '-')}"]
        expect(check["Status"] == status, f"HTTP check of {path}: {check}")
    a.agent.service.register("tcp-check", service_id="tcp-1", port=port,
                             check=consul.Check.tcp("127.0.0.1", port, "1s", "1s"))
    expect(a.agent.checks()["service:tcp-1"]["Status"] == "passing", "TCP check")
    # Several checks (check + extra_checks): ids service:{id}:N, health the worst of them.
    a.agent.service.register("multi", service_id="multi-1", port=port,
                             check=consul.Check.ttl("30s"),
                             extra_checks=[consul.Check.http(f"http://127.0.0.1:{port}/ok",
                                                             interval="1s")])
    checks = a.agent.checks()
    expect(checks["service:multi-1:1"]["Status"] == "critical"
           and checks["service:multi-1:2"]["Status"] == "passing", f"multi checks {checks}")
    expect(a.health.service("multi", passing=True)[1] == [], "one critical check: not passing")
    a.agent.check.ttl_pass("service:multi-1:1")
    expect(len(a.health.service("multi", passing=True)[1]) == 1, "all passing")
    server.shutdown()

    # KV, as Consul's: base64 values decoded by the client, indexes, recurse, keys, delete.
    expect(a.kv.put("app/config/limit", "100"), "kv put")
    expect(a.kv.put("app/config/name", b"web"), "kv put bytes")
    expect(a.kv.put("toplevel", "one segment"), "one-segment key")
    index, item = a.kv.get("app/config/limit")
    expect(item["Value"] == b"100" and item["Key"] == "app/config/limit", f"kv get {item}")
    expect(item["ModifyIndex"] >= item["CreateIndex"] > 0, f"kv indexes {item}")
    _, none = a.kv.get("app/absent")
    expect(none is None, "absent key is None")
    _, listed = a.kv.get("app/", recurse=True)
    expect([i["Key"] for i in listed] == ["app/config/limit", "app/config/name"], f"{listed}")
    _, keys = a.kv.get("app/", keys=True, separator="/")
    expect(keys == ["app/config/"], f"keys with separator {keys}")
    wait_for("kv replicated to b", lambda: b.kv.get("app/config/limit")[1] is not None)
    expect(a.kv.put("app/config/flagged", "f", flags=42), "kv put with flags")
    wait_for(
        "kv flags replicated to b",
        lambda: (b.kv.get("app/config/flagged")[1] or {}).get("Flags") == 42,
    )
    index, _ = b.kv.get("app/config/limit")
    def write_later():
        time.sleep(0.5)
        a.kv.put("app/config/limit", "200")
    writer = threading.Thread(target=write_later)
    writer.start()
    new_index, item = b.kv.get("app/config/limit", index=index, wait="20s")
    writer.join()
    expect(item["Value"] == b"200" and int(new_index) > int(index), f"blocking kv {item}")
    try:
        a.kv.put("app/config/limit", "300", cas=1)
        expect(False, "cas was accepted")
    except consul.ConsulException as error:
        expect("consensus" in str(error), f"cas refusal says why: {error}")
    expect(a.kv.delete("app/", recurse=True), "kv delete recurse")
    expect(a.kv.get("app/", recurse=True)[1] is None, "deleted")

    # A crashed node's instances leave the listings (kill -9 c).
    agents["c"][0].kill()
    took = wait_for("web-2 dropped after c crashed",
                    lambda: [e["Service"]["ID"] for e in b.health.service("web")[1]] == ["web-1"],
                    within=30)
    print(f"crashed node's instance dropped from b's health listing after {took:.1f} s")
    _, checks = b.health.state("critical")
    expect(any(c["CheckID"] == "serfHealth" and c["Node"] == "c" for c in checks),
           f"c's serfHealth critical: {checks}")

    expect(a.agent.service.deregister("web-1"), "deregister")
    expect("web-1" not in a.agent.services(), "deregistered")


def wait_for_entries(client, service, passing, count):
    result = {}
    def ready():
        result["value"] = client.health.service(service, passing=passing)
        return len(result["value"][1]) == count
    wait_for(f"{count} entries of {service}", ready)
    return result["value"]


if __name__ == "__main__":
    main()
