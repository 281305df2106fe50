#!/usr/bin/env python3
"""Network-namespace fault test: eight real grapevine agents, each in its own namespace.

    sudo python3 deploy/faults/netns.py --bin target/static/x86_64-unknown-linux-gnu/release/grapevine

The test creates (with unique names) a hub namespace holding a bridge, eight namespaces n1..n8
joined to it by veth pairs and a ninth namespace for an attacker. Every agent runs the LAN profile, binds
0.0.0.0:7946 in its namespace and joins through n1. Steps, each bounded in time:

  1. converge:  every agent sees all eight alive.
  2. loss:      nftables drops 25 % of the UDP and TCP packets arriving at every host
                (`numgen random mod 100 < 25`, on input, so each packet crossing the bridge
                is lost with 25 %), for LOSS_SECONDS (default 120). The Suspect and Down
                events about these healthy nodes in the agents' info logs are counted and
                printed; the step fails if any node was declared down.
  3. partition: split n1..n3 | n4..n8 with nftables; each side marks the other down; both
                sides write config keys, and one key is written on the left and then, later,
                on the right; heal; every agent sees all alive and holds the same config, in
                which the later write won.
  4. junk:      from the ninth namespace, at once: against n8's node port, connections send
                random bytes, and 256 connections (half after a hello) each declare an 8 MiB
                frame and send it slowly; against n7's HTTP API (it runs with --http and a token, which the
                attacker is given: the worst case), 256 connections each PUT an 8 MiB body
                (declared, or chunked) slowly. Each victim's RSS is sampled from /proc
                during the attack (bound: MAX_RSS_MB, default 32) and for SETTLE_SECONDS
                (default 60) after it; then it must be at most SETTLE_RSS_MB (default 16).
                Both must still answer and be seen alive by every other agent afterwards.

Everything the test made (agents, namespaces, veths, bridge) is removed at the end, on failure
and on SIGINT/SIGTERM alike. Needs root, iproute2 and nftables. Python 3 standard library only.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

NODES = [f"n{i}" for i in range(1, 9)]
PORT = 7946
POLL = 0.5
HTTP_PORT = 8500
# The HTTP victim's token (any non-loopback --http needs one); the attacker is given it.
HTTP_TOKEN = "netns-fault-test"
LEFT, RIGHT = NODES[:3], NODES[3:]
TCP_VICTIM, HTTP_VICTIM = NODES[-1], NODES[-2]
EVENT = re.compile(r'event=(Suspect|Down)\(Member \{ name: "([^"]+)"')
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Failure(Exception):
    """An expectation of the test was violated."""


def run(*args, check=True, timeout=20, **kwargs):
    return subprocess.run(args, check=check, timeout=timeout, capture_output=True, text=True,
                          **kwargs)


class Netns:
    def __init__(self, binary, prefix, loss_seconds, loss_percent, max_rss_mb, settle_seconds,
                 settle_rss_mb, log):
        self.binary = os.path.abspath(binary)
        self.prefix = prefix
        self.loss_seconds = loss_seconds
        self.loss_percent = loss_percent
        self.max_rss_mb = max_rss_mb
        self.settle_seconds = settle_seconds
        self.settle_rss_mb = settle_rss_mb
        self.log_level = log
        self.subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        self.namespaces = []
        self.agents = {}
        self.logdir = f"/tmp/{prefix}-logs"
        self.failures = []

    # ---- topology --------------------------------------------------------------------

    def ns(self, node):
        return f"{self.prefix}-{node}"

    def addr(self, node):
        index = 19 if node == "attacker" else 10 + int(node[1:])
        return f"{self.subnet}.{index}"

    def in_ns(self, node, *args, **kwargs):
        return run("ip", "netns", "exec", self.ns(node), *args, **kwargs)

    def build(self):
        # The bridge lives in a namespace of its own, so that the host's firewall (Docker's
        # FORWARD policy, br_netfilter) never sees the test's traffic and nothing on the
        # host changes.
        hub = f"{self.prefix}-hub"
        run("ip", "netns", "add", hub)
        self.namespaces.append(hub)
        run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", hub, "link", "set", "br0", "up")
        for index, node in enumerate(NODES + ["attacker"], start=1):
            name = self.ns(node)
            run("ip", "netns", "add", name)
            self.namespaces.append(name)
            run("ip", "-n", hub, "link", "add", f"h{index}", "type", "veth", "peer", "name",
                "eth0", "netns", name)
            run("ip", "-n", hub, "link", "set", f"h{index}", "master", "br0", "up")
            self.in_ns(node, "ip", "link", "set", "lo", "up")
            self.in_ns(node, "ip", "addr", "add", f"{self.addr(node)}/24", "dev", "eth0")
            self.in_ns(node, "ip", "link", "set", "eth0", "up")

    def start_agents(self):
        os.makedirs(self.logdir, exist_ok=True)
        env = dict(os.environ, RUST_LOG=self.log_level, NO_COLOR="1")
        for node in NODES:
            log = open(os.path.join(self.logdir, f"{node}.log"), "w")
            args = ["ip", "netns", "exec", self.ns(node), self.binary, "agent",
                    "--name", node, "--profile", "lan", "--bind", f"0.0.0.0:{PORT}",
                    "--advertise", f"{self.addr(node)}:{PORT}"]
            if node != NODES[0]:
                args += ["--join", f"{self.addr(NODES[0])}:{PORT}"]
            if node == HTTP_VICTIM:
                args += ["--http", f"0.0.0.0:{HTTP_PORT}", "--http-token", HTTP_TOKEN]
            # `ip netns exec` execs the agent: this pid is the agent's.
            self.agents[node] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env)

    def teardown(self):
        for node, proc in self.agents.items():
            if proc.poll() is None:
                proc.kill()
        for proc in self.agents.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for name in self.namespaces:
            # Anything still running in the namespace (an attacker script) is ours.
            pids = run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", name, check=False)

    # ---- reading agents --------------------------------------------------------------

    def cli_json(self, node, *args):
        try:
            out = self.in_ns(node, self.binary, *args, "--agent", f"127.0.0.1:{PORT}", "--json",
                             check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError as error:
            raise Failure(f"{node}: `grapevine {' '.join(args)} --json` printed bad JSON: {error}")

    def members(self, node):
        rows = self.cli_json(node, "members")
        return None if rows is None else {row["name"]: row["status"] for row in rows}

    def config(self, node):
        return self.cli_json(node, "config", "list")

    def set_config(self, node, key, value):
        out = self.in_ns(node, self.binary, "config", "set", key, value,
                         "--agent", f"127.0.0.1:{PORT}", check=False, timeout=15)
        if out.returncode != 0:
            raise Failure(f"{node}: config set {key} failed: {out.stderr.strip()}")

    def wait(self, what, limit, condition):
        started = time.monotonic()
        detail = None
        while time.monotonic() - started < limit:
            ok, detail = condition()
            if ok:
                print(f"   {what}: {time.monotonic() - started:.1f} s", flush=True)
                return
            time.sleep(POLL)
        raise Failure(f"{what}: not within {limit} s; last seen: {detail}")

    def all_see(self, observers, expected):
        def check():
            seen = {}
            for node in observers:
                view = self.members(node)
                seen[node] = view
                if view is None or any(view.get(n) != s for n, s in expected.items()):
                    return False, seen
            return True, seen
        return check

    def log_offsets(self):
        return {n: os.path.getsize(os.path.join(self.logdir, f"{n}.log")) for n in NODES}

    def events_since(self, offsets):
        """(observer, kind, subject) of every Suspect/Down event logged after `offsets`."""
        events = []
        for node in NODES:
            with open(os.path.join(self.logdir, f"{node}.log"), errors="replace") as log:
                log.seek(offsets[node])
                for line in log:
                    match = EVENT.search(ANSI.sub("", line))
                    if match:
                        events.append((node, match.group(1), match.group(2)))
        return events

    def check_agents_running(self):
        dead = [n for n, p in self.agents.items() if p.poll() is not None]
        if dead:
            raise Failure(f"agents exited: {dead}")

    # ---- nftables --------------------------------------------------------------------

    def nft(self, node, script):
        out = self.in_ns(node, "nft", "-f", "-", input=script, check=False)
        if out.returncode != 0:
            raise Failure(f"{node}: nft failed: {out.stderr.strip()}")

    def add_loss(self, nodes):
        rule = (f"table inet {self.prefix}loss {{ chain input {{ type filter hook input "
                f"priority 0; policy accept; iif lo accept; meta l4proto {{ udp, tcp }} "
                f"numgen random mod 100 < {self.loss_percent} drop; }}; }}\n")
        for node in nodes:
            self.nft(node, rule)

    def del_table(self, nodes, table):
        for node in nodes:
            self.in_ns(node, "nft", "delete", "table", "inet", f"{self.prefix}{table}",
                       check=False)

    def add_partition(self):
        for side, other in ((LEFT, RIGHT), (RIGHT, LEFT)):
            others = ", ".join(self.addr(n) for n in other)
            rule = (f"table inet {self.prefix}cut {{ chain input {{ type filter hook input "
                    f"priority 0; policy accept; ip saddr {{ {others} }} drop; }}; }}\n")
            for node in side:
                self.nft(node, rule)

    # ---- steps -----------------------------------------------------------------------

    def step_converge(self):
        print("== 1. converge: 8 agents in namespaces, LAN profile", flush=True)
        self.wait("every agent sees all 8 alive", 60,
                  self.all_see(NODES, {n: "alive" for n in NODES}))

    def step_loss(self):
        print(f"== 2. {self.loss_percent} % loss on every host for {self.loss_seconds} s",
              flush=True)
        offsets = self.log_offsets()
        self.add_loss(NODES)
        started = time.monotonic()
        try:
            while time.monotonic() - started < self.loss_seconds:
                self.check_agents_running()
                time.sleep(1)
        finally:
            self.del_table(NODES, "loss")
        events = self.events_since(offsets)
        suspects = [e for e in events if e[1] == "Suspect"]
        downs = [e for e in events if e[1] == "Down"]
        print(f"   false suspicions of healthy nodes: {len(suspects)}", flush=True)
        print(f"   false downs of healthy nodes: {len(downs)}", flush=True)
        for observer, kind, subject in downs:
            print(f"     {observer} declared {subject} down", flush=True)
        print("NETNS_LOSS_COUNTS " + json.dumps(
            {"loss_percent": self.loss_percent, "seconds": self.loss_seconds,
             "suspicions": len(suspects), "downs": len(downs)}), flush=True)
        # Downs renew identities; the cluster must be whole again before the next step.
        self.wait("every agent sees all 8 alive after the loss", 60,
                  self.all_see(NODES, {n: "alive" for n in NODES}))
        if downs:
            self.failures.append(f"{len(downs)} downs of healthy nodes under "
                                 f"{self.loss_percent} % loss")

    def step_partition(self):
        print(f"== 3. partition {'+'.join(LEFT)} | {'+'.join(RIGHT)}", flush=True)
        before = self.config(NODES[0]) or {}
        self.add_partition()
        healed = False
        try:
            self.wait("left side marks the right side down", 60,
                      self.all_see(LEFT, {n: "down" for n in RIGHT}))
            self.wait("right side marks the left side down", 60,
                      self.all_see(RIGHT, {n: "down" for n in LEFT}))
            self.set_config(LEFT[0], "netns/split/left", "l")
            self.set_config(RIGHT[0], "netns/split/right", "r")
            self.set_config(LEFT[1], "netns/split/both", "left-earlier")
            time.sleep(1.5)  # so that the right side's write is later by any clock
            self.set_config(RIGHT[1], "netns/split/both", "right-later")
            self.del_table(NODES, "cut")
            healed = True
        finally:
            if not healed:
                self.del_table(NODES, "cut")
        expected = dict(before)
        expected.update({"netns/split/left": "l", "netns/split/right": "r",
                         "netns/split/both": "right-later"})

        def whole():
            seen = {}
            for node in NODES:
                view, config = self.members(node), self.config(node)
                seen[node] = (view, config)
                if view is None or any(view.get(n) != "alive" for n in NODES):
                    return False, seen
                if config != expected:
                    return False, seen
            return True, seen
        self.wait("healed: all alive, every key identical, the later write won", 90, whole)

    def rss_kib(self, node):
        with open(f"/proc/{self.agents[node].pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise Failure(f"{node}: no VmRSS")

    def step_junk(self, seconds=25):
        victims = {"tcp": TCP_VICTIM, "http": HTTP_VICTIM}
        print(f"== 4. junk from a ninth namespace: TCP frames against {TCP_VICTIM}, HTTP "
              f"bodies against {HTTP_VICTIM}", flush=True)
        attacks = {
            "tcp": ATTACKER.format(host=self.addr(TCP_VICTIM), port=PORT, seconds=seconds),
            "http": HTTP_ATTACKER.format(host=self.addr(HTTP_VICTIM), port=HTTP_PORT,
                                         seconds=seconds, token=HTTP_TOKEN),
        }
        baseline = {kind: self.rss_kib(node) for kind, node in victims.items()}
        peak = dict(baseline)
        attackers = {kind: subprocess.Popen(["ip", "netns", "exec", self.ns("attacker"),
                                             "python3", "-c", attack],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)
                     for kind, attack in attacks.items()}
        started = time.monotonic()
        while (any(a.poll() is None for a in attackers.values())
               and time.monotonic() - started < seconds + 15):
            self.check_agents_running()
            for kind, node in victims.items():
                peak[kind] = max(peak[kind], self.rss_kib(node))
            time.sleep(0.2)
        for kind, attacker in attackers.items():
            if attacker.poll() is None:
                attacker.kill()
            report = attacker.communicate(timeout=5)[0].strip()
            print(f"   {kind} attacker: {report}", flush=True)
        # A minute after the attack: memory must have gone back, not just stopped growing.
        print(f"   sampling RSS for {self.settle_seconds} s after the attack", flush=True)
        ended = time.monotonic()
        while time.monotonic() - ended < self.settle_seconds:
            self.check_agents_running()
            for kind, node in victims.items():
                peak[kind] = max(peak[kind], self.rss_kib(node))
            time.sleep(1)
        after = {kind: self.rss_kib(node) for kind, node in victims.items()}
        for kind, node in victims.items():
            print(f"   {node} RSS ({kind}): {baseline[kind] / 1024:.1f} MiB before, peak "
                  f"{peak[kind] / 1024:.1f} MiB (bound {self.max_rss_mb} MiB), "
                  f"{after[kind] / 1024:.1f} MiB {self.settle_seconds} s after "
                  f"(bound {self.settle_rss_mb} MiB)", flush=True)
            line = {"victim": node, "baseline_kib": baseline[kind], "peak_kib": peak[kind],
                    "after_kib": after[kind], "after_seconds": self.settle_seconds}
            tag = "NETNS_JUNK_RSS" if kind == "tcp" else "NETNS_HTTP_RSS"
            print(f"{tag} " + json.dumps(line), flush=True)
            if peak[kind] > self.max_rss_mb * 1024:
                self.failures.append(f"{node} RSS peaked at {peak[kind] / 1024:.1f} MiB under "
                                     f"the {kind} attack (bound {self.max_rss_mb} MiB)")
            if after[kind] > self.settle_rss_mb * 1024:
                self.failures.append(f"{node} RSS was {after[kind] / 1024:.1f} MiB "
                                     f"{self.settle_seconds} s after the {kind} attack "
                                     f"(bound {self.settle_rss_mb} MiB)")
        self.wait("the victims answer and every agent sees all alive after the junk", 60,
                  self.all_see(NODES, {n: "alive" for n in NODES}))

        def http_answers():
            try:
                out = self.in_ns(HTTP_VICTIM, "python3", "-c", HTTP_PROBE.format(
                    port=HTTP_PORT, token=HTTP_TOKEN), check=False, timeout=10)
            except subprocess.TimeoutExpired:
                return False, "timeout"
            return out.returncode == 0, out.stdout.strip() or out.stderr.strip()
        self.wait(f"{HTTP_VICTIM}'s HTTP API answers after the attack", 30, http_answers)


# Runs in the attacker's namespace: random bytes on some connections, and 256 connections
# that each declare an 8 MiB frame (half of them after a hello) and then send it slowly,
# until `seconds` have passed.
ATTACKER = r"""
import os, random, socket, struct, time
host, port, seconds = "{host}", {port}, {seconds}
random.seed(19)
junk_sent = 0
for _ in range(64):
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(os.urandom(random.randint(1, 4096)))
        s.close()
        junk_sent += 1
    except OSError:
        pass
# Half open with a hello, as anyone can on an unencrypted cluster: those reach the frame
# budget; the other half are refused from their first header.
hello = b"grapevin" + struct.pack(">H", 1)
conns = []
for index in range(256):
    try:
        s = socket.create_connection((host, port), timeout=3)
        if index % 2 == 0:
            s.sendall(struct.pack(">I", len(hello)) + hello)
        s.setblocking(False)
        s.send(struct.pack(">I", 8 * 1024 * 1024 - 16))
        conns.append(s)
    except OSError:
        pass
opened = len(conns)
chunk = os.urandom(16 * 1024)
deadline = time.monotonic() + seconds
sent = 0
while time.monotonic() < deadline and conns:
    alive = []
    for s in conns:
        try:
            sent += s.send(chunk)
            alive.append(s)
        except BlockingIOError:
            alive.append(s)
        except OSError:
            s.close()
    conns = alive
    time.sleep(0.25)
print(f"{{junk_sent}} junk connections, {{opened}} slow 8 MiB frames opened, "
      f"{{len(conns)}} still open at the end, {{sent // 1024}} KiB sent")
"""


# Runs in the attacker's namespace: 256 connections that each PUT an 8 MiB body slowly
# (half with Content-Length, half chunked), reconnecting whenever the agent closes one,
# until `seconds` have passed.
HTTP_ATTACKER = r"""
import os, socket, time
host, port, seconds, token = "{host}", {port}, {seconds}, "{token}"
def open_one(index):
    s = socket.create_connection((host, port), timeout=3)
    if index % 2:
        framing = "Transfer-Encoding: chunked"
    else:
        framing = "Content-Length: " + str(8 * 1024 * 1024)
    head = ("PUT /v1/kv/hostile/" + str(index) + " HTTP/1.1\r\nHost: x\r\n"
            "X-Consul-Token: " + token + "\r\n" + framing + "\r\n\r\n")
    s.sendall(head.encode())
    s.setblocking(False)
    return s
chunk = os.urandom(16 * 1024)
framed_chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
conns = {{}}
opened = 0
deadline = time.monotonic() + seconds
sent = 0
while time.monotonic() < deadline:
    for index in range(256):
        if index not in conns:
            try:
                conns[index] = open_one(index)
                opened += 1
            except OSError:
                continue
        s = conns[index]
        try:
            sent += s.send(framed_chunk if index % 2 else chunk)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            del conns[index]
    time.sleep(0.25)
print(f"{{opened}} slow 8 MiB bodies opened, {{len(conns)}} still open at the end, "
      f"{{sent // 1024}} KiB sent")
"""

# Runs in the HTTP victim's namespace: exits 0 when the API answers 200.
HTTP_PROBE = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
s.sendall(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\nX-Consul-Token: {token}\r\n"
          b"Connection: close\r\n\r\n")
answer = s.recv(256).decode(errors="replace")
print(answer.splitlines()[0] if answer else "no answer")
sys.exit(0 if " 200 " in answer else 1)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="the grapevine binary")
    parser.add_argument("--loss-seconds", type=int,
                        default=int(os.environ.get("LOSS_SECONDS", "120")))
    parser.add_argument("--loss-percent", type=int, default=25)
    parser.add_argument("--max-rss-mb", type=int,
                        default=int(os.environ.get("MAX_RSS_MB", "32")))
    parser.add_argument("--settle-seconds", type=int,
                        default=int(os.environ.get("SETTLE_SECONDS", "60")))
    parser.add_argument("--settle-rss-mb", type=int,
                        default=int(os.environ.get("SETTLE_RSS_MB", "16")))
    parser.add_argument("--prefix", default=f"gv{os.urandom(3).hex()}",
                        help="prefix of every name the test makes (at most 8 characters)")
    args = parser.parse_args()
    if len(args.prefix) > 8:
        parser.error("--prefix: at most 8 characters (interface names are short)")
    test = Netns(args.bin, args.prefix, args.loss_seconds, args.loss_percent,
                 args.max_rss_mb, args.settle_seconds, args.settle_rss_mb,
                 os.environ.get("FAULT_LOG", "info"))

    def on_signal(number, _frame):
        raise SystemExit(f"signal {number}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    ok = False
    try:
        print(f"== netns fault test: prefix {args.prefix}, subnet {test.subnet}.0/24", flush=True)
        test.build()
        test.start_agents()
        test.step_converge()
        test.step_loss()
        test.step_partition()
        test.step_junk()
        ok = not test.failures
    except Failure as error:
        test.failures.append(str(error))
    finally:
        if not ok:
            for node in NODES:
                path = os.path.join(test.logdir, f"{node}.log")
                if os.path.exists(path):
                    with open(path, errors="replace") as log:
                        tail = log.readlines()[-15:]
                    print(f"---- {node} log (last lines)\n" + "".join(tail), end="")
        test.teardown()
        subprocess.run(["rm", "-rf", test.logdir], check=False)
    print(f"== netns fault test: {time.monotonic() - started:.0f} s", flush=True)
    for failure in test.failures:
        print(f"FAILED: {failure}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
