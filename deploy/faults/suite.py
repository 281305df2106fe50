#!/usr/bin/env python3
"""Fault-test suite: five grapevine agents in Docker containers, driven through the engine.

    python3 deploy/faults/suite.py --image grapevine:latest

Starts five agents on a private network (every agent joins through the one seed name
`grapevine`, a network alias of every agent); each registers a service and writes a config
key. Then, reading state with `grapevine members/services/config list --json` inside the
containers (`docker exec`):

  1. kill:      `docker kill` one agent; every other marks it down and drops its instance;
                `docker start` it; it rejoins and re-registers.
  2. partition: split 2 | 3; each side marks the other down; both sides write config
                (including one key written on both sides); heal; one membership, one
                catalog and one config everywhere.
  3. pause:     `docker pause` one agent until the others declare it down, then unpause;
                it returns to alive by itself.
  4. rolling:   restart all five, one at a time; no config key is lost and every service is
                findable at the end.
  5. stop-all:  `docker stop` all five (SIGTERM), then `docker start` them: every config key
                and every registration (the declared ones and one made at run time through
                the HTTP API) is back, from the agents' data dirs (a volume each).
  6. kill-all:  the same after `docker kill` of all five.

Every wait is bounded and prints how long convergence took; any violated expectation exits
non-zero. Containers and the network carry a unique prefix and are removed at the end, on
failure and on SIGINT/SIGTERM alike.

Why the partition uses iptables and not `docker network disconnect`: an agent gossips to one
advertised address. Disconnecting two containers from the network they share with the other
three also cuts them from each other (1 | 1 | 3), and a second network does not help, because
their peers still address them by their address on the first. Routing each side's own
network to the other through a shared one (so that disconnecting from the shared network cuts
only cross traffic) needs routes inside every container and an exception in the host's
Docker firewall (DOCKER-USER), which changes the host for every container. So the suite
drops traffic between the two sides with iptables rules inside each container's network
namespace, entered from the host with `nsenter` (root needed): a real 2 | 3 split of UDP and
TCP, where every side still talks within itself, and nothing outside the containers changes.

Environment: FAULT_LOG sets the agents' RUST_LOG (default info); container logs are printed
on failure. Python 3 standard library only.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

NODES = ["n1", "n2", "n3", "n4", "n5"]
PORT = 7946
SEED_ALIAS = "grapevine"
POLL = 0.5
STEPS = ["kill", "partition", "pause", "rolling", "stop_all", "kill_all"]
HTTP_PORT = 8500
# A service registered at run time on n1, through its HTTP API: only its data dir brings it
# back after a full restart.
RUNTIME_SERVICE = {"name": "runtime-n1", "port": 9100}


class Failure(Exception):
    """An expectation of the suite was violated."""


class Suite:
    def __init__(self, image, profile, prefix, verbose):
        self.image = image
        self.profile = profile
        self.prefix = prefix
        self.network = f"{prefix}-net"
        self.verbose = verbose
        self.timings = []
        self.config_keys = {}
        self.partitions = 0
        self.created = []
        self.runtime_registered = False

    # ---- docker plumbing -------------------------------------------------------------

    def docker(self, *args, check=True, timeout=60):
        try:
            done = subprocess.run(
                ["docker", *args],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            if check:
                raise Failure(f"docker {' '.join(args)}: no answer within {timeout} s")
            return None
        if check and done.returncode != 0:
            raise Failure(f"docker {' '.join(args)}: {done.stderr.strip()}")
        return done

    def container(self, node):
        return f"{self.prefix}-{node}"

    def grapevine(self, node, *args):
        """Runs the CLI inside a node's container; None if it cannot answer (down, paused)."""
        done = self.docker("exec", self.container(node), "/grapevine", *args,
                           check=False, timeout=15)
        if done is None or done.returncode != 0:
            return None
        return done.stdout

    def grapevine_json(self, node, *args):
        out = self.grapevine(node, *args, "--json")
        if out is None:
            return None
        try:
            return json.loads(out)
        except json.JSONDecodeError as error:
            raise Failure(f"{node}: `grapevine {' '.join(args)} --json` printed bad JSON: {error}")

    def start_network(self):
        self.docker("network", "create", self.network)
        self.created.append(("network", self.network))

    def run_agent(self, node):
        name = self.container(node)
        self.docker(
            "run", "--detach", "--name", name, "--hostname", name,
            "--network", self.network, "--network-alias", SEED_ALIAS,
            # An anonymous volume: kept across stop/start, removed with the container.
            "--mount", "type=volume,target=/data",
            "--env", f"RUST_LOG={os.environ.get('FAULT_LOG', 'info')}",
            self.image, "agent",
            "--name", node,
            "--bind", f"0.0.0.0:{PORT}",
            "--join", f"{SEED_ALIAS}:{PORT}",
            "--profile", self.profile,
            "--service", f"app-{node}:9000",
            "--no-check",
            "--data-dir", "/data",
            "--http", f"127.0.0.1:{HTTP_PORT}",
        )
        self.created.append(("container", name))

    def pid(self, node):
        out = self.docker("inspect", "--format", "{{.State.Pid}}", self.container(node)).stdout
        return out.strip()

    def ip(self, node):
        out = self.docker(
            "inspect", "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            self.container(node),
        ).stdout
        return out.strip()

    def iptables(self, node, *rule):
        done = subprocess.run(
            ["nsenter", "--target", self.pid(node), "--net", "iptables", *rule],
            capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            raise Failure(f"iptables {' '.join(rule)} in {node}: {done.stderr.strip()}")

    def http_put(self, node, path, body):
        """PUT a JSON body to `node`'s loopback-only HTTP API, from inside its network
        namespace (entered with nsenter, as the partition step does)."""
        script = (
            "import json, sys, urllib.request\n"
            f"req = urllib.request.Request('http://127.0.0.1:{HTTP_PORT}{path}', "
            "data=sys.stdin.read().encode(), method='PUT', "
            "headers={'Content-Type': 'application/json'})\n"
            "print(urllib.request.urlopen(req, timeout=10).read().decode())\n"
        )
        done = subprocess.run(
            ["nsenter", "--target", self.pid(node), "--net", sys.executable, "-c", script],
            input=json.dumps(body), capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            raise Failure(f"PUT {path} on {node}: {done.stderr.strip()}")

    def cleanup(self):
        for kind, name in reversed(self.created):
            if kind == "container":
                self.docker("rm", "--force", "--volumes", name, check=False)
            else:
                self.docker("network", "rm", name, check=False)
        self.created.clear()

    def dump_logs(self):
        for kind, name in self.created:
            if kind != "container":
                continue
            done = self.docker("logs", "--tail", "40", name, check=False, timeout=20)
            if done is not None:
                print(f"---- last log lines of {name}", file=sys.stderr)
                print((done.stdout + done.stderr).rstrip(), file=sys.stderr)

    # ---- reading cluster state -------------------------------------------------------

    def members(self, node):
        """name -> status as `node` sees it, or None if it does not answer."""
        rows = self.grapevine_json(node, "members")
        if rows is None:
            return None
        return {row["name"]: row["status"] for row in rows}

    def generations(self, node):
        """name -> identity generation as `node` sees it, or None if it does not answer."""
        rows = self.grapevine_json(node, "members")
        if rows is None:
            return None
        return {row["name"]: row["generation"] for row in rows}

    def newer_everywhere(self, victim, before):
        """Condition: every node lists `victim` under a generation above `before` (a new
        incarnation: restarted, or renewed after being declared down)."""
        def check():
            seen = {}
            for node in NODES:
                generations = self.generations(node)
                seen[node] = None if generations is None else generations.get(victim)
                if seen[node] is None or seen[node] <= before:
                    return False, seen
            return True, seen
        return check

    def generation_of(self, victim):
        generations = self.generations(victim)
        if generations is None or victim not in generations:
            raise Failure(f"{victim} does not list itself")
        return generations[victim]

    def findable(self, node):
        """The (service, node) pairs `node` would hand out: passing, on an alive node."""
        rows = self.grapevine_json(node, "services")
        if rows is None:
            return None
        return sorted(
            (row["service"], row["node"])
            for row in rows
            if row["health"] == "passing" and row["node_status"] == "alive"
        )

    def config(self, node):
        return self.grapevine_json(node, "config", "list")

    # ---- waiting ---------------------------------------------------------------------

    def wait(self, what, limit, condition, since=None):
        """Polls `condition` (returning (ok, detail)) until ok; records the time taken since
        `since` (a time.monotonic() value; default now)."""
        started = time.monotonic() if since is None else since
        detail = None
        while True:
            ok, detail = condition()
            elapsed = time.monotonic() - started
            if ok:
                self.timings.append((what, elapsed))
                print(f"  ok  {what}: {elapsed:.1f} s", flush=True)
                return elapsed
            if elapsed > limit:
                raise Failure(f"{what}: not reached within {limit} s; last state: {detail}")
            time.sleep(POLL)

    def all_see(self, observers, expected):
        """Condition: every observer sees exactly `expected` (name -> status) for those names."""
        def check():
            seen = {}
            for node in observers:
                view = self.members(node)
                seen[node] = view
                if view is None:
                    return False, seen
                if any(view.get(name) != status for name, status in expected.items()):
                    return False, seen
            return True, seen
        return check

    def state_of(self, node):
        members = self.members(node)
        if members is None:
            return None
        return {
            "members": members,
            "services": self.findable(node),
            "config": self.config(node),
        }

    def converged(self, nodes, expect_services=None, expect_config=None):
        """Condition: every node is up, sees all of `nodes` alive, and all hold one catalog
        and one config (equal to the expectations when given)."""
        def check():
            states = {}
            for node in nodes:
                state = self.state_of(node)
                states[node] = state
                if state is None or state["services"] is None or state["config"] is None:
                    return False, states
                if any(state["members"].get(n) != "alive" for n in nodes):
                    return False, states
            first = states[nodes[0]]
            for state in states.values():
                if state["services"] != first["services"] or state["config"] != first["config"]:
                    return False, states
                if sorted(state["members"].items()) != sorted(first["members"].items()):
                    return False, states
            if expect_services is not None and first["services"] != expect_services:
                return False, states
            if expect_config is not None and first["config"] != expect_config:
                return False, states
            return True, states
        return check

    def all_services(self):
        services = [(f"app-{n}", n) for n in NODES]
        if self.runtime_registered:
            services.append((RUNTIME_SERVICE["name"], "n1"))
        return sorted(services)

    # ---- the steps -------------------------------------------------------------------

    def start_cluster(self):
        print(f"== start: {len(NODES)} agents, profile {self.profile}, prefix {self.prefix}")
        self.start_network()
        for node in NODES:
            self.run_agent(node)
        everyone = {n: "alive" for n in NODES}
        self.wait("5 agents see each other alive", 60, self.all_see(NODES, everyone))
        for node in NODES:
            key, value = f"suite/{node}/started", f"by-{node}"
            if self.grapevine(node, "config", "set", key, value) is None:
                raise Failure(f"{node}: config set {key} failed")
            self.config_keys[key] = value
        self.wait("every service and config key on every node", 30,
                  self.converged(NODES, self.all_services(), self.config_keys))

    def step_kill(self):
        victim = "n3"
        others = [n for n in NODES if n != victim]
        print(f"== 1. docker kill {victim}")
        before = self.generation_of(victim)
        self.docker("kill", self.container(victim))

        def dropped():
            ok, seen = self.all_see(others, {victim: "down"})()
            if not ok:
                return False, seen
            for node in others:
                services = self.findable(node)
                if services is None or any(owner == victim for _, owner in services):
                    return False, {node: services}
            return True, seen
        self.wait(f"every other agent marks {victim} down and drops its instance", 60, dropped)
        restarted = time.monotonic()
        self.docker("start", self.container(victim))
        self.wait(f"{victim} rejoins as a new incarnation", 60,
                  self.newer_everywhere(victim, before), since=restarted)
        self.wait(f"{victim} re-registered and has every config key", 60,
                  self.converged(NODES, self.all_services(), self.config_keys),
                  since=restarted)

    def step_partition(self):
        left, right = ["n1", "n2"], ["n3", "n4", "n5"]
        self.partitions += 1
        split = f"suite/split{self.partitions}"
        print(f"== 2. partition {'+'.join(left)} | {'+'.join(right)} (iptables in each netns)")
        ips = {n: self.ip(n) for n in NODES}
        rules = []
        for side, other in ((left, right), (right, left)):
            for node in side:
                for peer in other:
                    rules.append((node, ("INPUT", "-s", ips[peer], "-j", "DROP")))
                    rules.append((node, ("OUTPUT", "-d", ips[peer], "-j", "DROP")))
        cut = time.monotonic()
        for node, (chain, *rule) in rules:
            self.iptables(node, "-I", chain, *rule)
        healed = False
        try:
            marks = {n: "down" for n in right}
            marks.update({n: "alive" for n in left})
            self.wait("left side marks the right side down", 60, self.all_see(left, marks),
                      since=cut)
            marks = {n: "down" for n in left}
            marks.update({n: "alive" for n in right})
            self.wait("right side marks the left side down", 60, self.all_see(right, marks),
                      since=cut)
            # Writes on both sides, one key on both sides at once (last writer wins).
            writes = [
                ("n1", f"{split}/left", "written-on-left"),
                ("n4", f"{split}/right", "written-on-right"),
                ("n2", f"{split}/both", "left-value"),
                ("n5", f"{split}/both", "right-value"),
            ]
            for node, key, value in writes:
                if self.grapevine(node, "config", "set", key, value) is None:
                    raise Failure(f"{node}: config set {key} failed during the partition")

            def sides_apart():
                for side, mine, theirs in ((left, f"{split}/left", f"{split}/right"),
                                           (right, f"{split}/right", f"{split}/left")):
                    for node in side:
                        config = self.config(node)
                        if config is None or mine not in config:
                            return False, {node: config}
                        if theirs in config:
                            raise Failure(f"{node} got {theirs} across the partition")
                return True, None
            self.wait("each side sees its own writes only", 30, sides_apart)
            heal = time.monotonic()
            for node, (chain, *rule) in rules:
                self.iptables(node, "-D", chain, *rule)
            healed = True
        finally:
            if not healed:
                for node, (chain, *rule) in rules:
                    subprocess.run(["nsenter", "--target", self.pid(node), "--net",
                                    "iptables", "-D", chain, *rule], capture_output=True)
        print("   healed")
        expected = dict(self.config_keys)
        expected[f"{split}/left"] = "written-on-left"
        expected[f"{split}/right"] = "written-on-right"

        def one_config():
            ok, states = self.converged(NODES, self.all_services())()
            if not ok:
                return False, states
            config = states[NODES[0]]["config"]
            winner = config.get(f"{split}/both")
            if winner not in ("left-value", "right-value"):
                return False, config
            if {k: v for k, v in config.items() if k != f"{split}/both"} != expected:
                return False, config
            return True, states
        self.wait("healed: one membership, one catalog, one config everywhere", 180,
                  one_config, since=heal)
        config = self.config("n1")
        self.config_keys = config
        print(f"   {split}/both = {config[f'{split}/both']} on every node (last writer wins)")

    def step_pause(self):
        victim = "n2"
        others = [n for n in NODES if n != victim]
        print(f"== 3. docker pause {victim} until the others declare it down")
        before = self.generation_of(victim)
        paused = time.monotonic()
        self.docker("pause", self.container(victim))
        unpaused = False
        try:
            self.wait(f"every other agent marks paused {victim} down", 60,
                      self.all_see(others, {victim: "down"}), since=paused)
            resumed = time.monotonic()
            self.docker("unpause", self.container(victim))
            unpaused = True
        finally:
            if not unpaused:
                self.docker("unpause", self.container(victim), check=False)
        self.wait(f"{victim} alive again everywhere (renewed identity), no manual step", 60,
                  self.newer_everywhere(victim, before), since=resumed)
        self.wait("one membership, catalog and config after the pause", 60,
                  self.converged(NODES, self.all_services(), self.config_keys), since=resumed)

    def step_rolling(self):
        print("== 4. rolling restart (SIGTERM, restart), one agent at a time")
        started = time.monotonic()
        for node in NODES:
            before = self.generation_of(node)
            restart = time.monotonic()
            self.docker("restart", "--time", "15", self.container(node), timeout=90)
            self.wait(f"{node} restarted (leave, start) and seen as a new incarnation", 60,
                      self.newer_everywhere(node, before), since=restart)
            self.wait(f"{node} back with every key and service", 60,
                      self.converged(NODES, self.all_services(), self.config_keys),
                      since=restart)
        total = time.monotonic() - started
        self.timings.append(("rolling restart of all five", total))
        print(f"  ok  rolling restart of all five: {total:.1f} s")
        final = self.config("n1")
        if final != self.config_keys:
            raise Failure(f"config changed by the restarts: {final} != {self.config_keys}")

    def restart_all(self, how):
        started = time.monotonic()
        if how == "stop":
            # Sequentially, as an operator's `docker-compose stop` does.
            for node in NODES:
                self.docker("stop", "--time", "15", self.container(node), timeout=60)
        else:
            self.docker("kill", *[self.container(n) for n in NODES])
        for node in NODES:
            self.docker("start", self.container(node))
        self.wait(f"all five back after docker {how} with every key and registration", 90,
                  self.converged(NODES, self.all_services(), self.config_keys),
                  since=started)

    def register_runtime_service(self):
        if self.runtime_registered:
            return
        self.http_put("n1", "/v1/agent/service/register", RUNTIME_SERVICE)
        self.runtime_registered = True
        key, value = "suite/runtime/written", "before-full-restart"
        if self.grapevine("n2", "config", "set", key, value) is None:
            raise Failure(f"n2: config set {key} failed")
        self.config_keys[key] = value
        if self.grapevine("n3", "config", "del", "suite/n3/started") is None:
            raise Failure("n3: config del failed")
        del self.config_keys["suite/n3/started"]
        self.wait("the run-time registration and writes everywhere", 30,
                  self.converged(NODES, self.all_services(), self.config_keys))

    def step_stop_all(self):
        print("== 5. docker stop of all five, then docker start")
        self.register_runtime_service()
        self.restart_all("stop")

    def step_kill_all(self):
        print("== 6. docker kill of all five, then docker start")
        self.register_runtime_service()
        self.restart_all("kill")

    def run(self, steps):
        self.start_cluster()
        for step in steps:
            getattr(self, f"step_{step}")()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="grapevine:latest", help="agent image to test")
    parser.add_argument("--profile", default="lan", choices=["lan", "local", "wan"],
                        help="the agents' timing profile (default lan)")
    parser.add_argument("--prefix", default=f"gvfault-{uuid.uuid4().hex[:8]}",
                        help="name prefix of every container and network made")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, in order (default {','.join(STEPS)})")
    parser.add_argument("--keep", action="store_true",
                        help="leave the containers running at the end (for debugging)")
    args = parser.parse_args()
    steps = [step for step in args.steps.split(",") if step]
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {STEPS}")
    if os.geteuid() != 0:
        print("warning: the partition step enters network namespaces with nsenter and "
              "needs root", file=sys.stderr)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    suite = Suite(args.image, args.profile, args.prefix, verbose=False)
    started = time.monotonic()
    status = 0
    try:
        suite.run(steps)
    except Failure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        suite.dump_logs()
        status = 1
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt}); cleaning up", file=sys.stderr)
        status = 130
    finally:
        if args.keep and status == 0:
            print(f"kept: containers {args.prefix}-n1..n5, network {suite.network}")
        else:
            suite.cleanup()
    wall = time.monotonic() - started
    print(f"== timings (profile {args.profile})")
    for what, seconds in suite.timings:
        print(f"  {seconds:6.1f} s  {what}")
    print(f"  {wall:6.1f} s  whole suite (wall time)")
    print("PASSED" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
