#!/usr/bin/env python3
"""Idle traffic of grapevine and of the memberlist crate, measured in one run.

Each system runs N nodes in one process, alone in a network namespace made for it, all at
the same time; bytes are the kernel's loopback transmit counter of that namespace (IP and
UDP/TCP headers included, the same for both), over the same idle window after convergence.
memberlist runs with its LAN defaults (`Options::lan()`: probe every 500 ms) and, as a second
row, with Go memberlist's LAN probe interval (1 s), its cheapest documented LAN setting.

Needs root (ip netns). Usage: sudo python3 scripts/idle_vs_memberlist.py [--sizes 5,20,50]
"""
import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "benches", "peers", "memberlist-idle")
BUILD = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
TARGET = os.path.join(BUILD, "peers")


def build():
    subprocess.run(["cargo", "build", "-q", "--release", "--example", "idle_traffic"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-q", "--release", "--manifest-path",
                    os.path.join(PEER, "Cargo.toml"), "--target-dir", TARGET],
                   check=True)


def netns(name):
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="5,20,50")
    parser.add_argument("--idle", type=int, default=30)
    parser.add_argument("--settle", type=int, default=10)
    args = parser.parse_args()
    build()
    grapevine = os.path.join(BUILD, "release", "examples", "idle_traffic")
    memberlist = os.path.join(TARGET, "release", "memberlist-idle")
    window = ["--idle", str(args.idle), "--settle", str(args.settle)]
    rows = []
    print(f"{'nodes':>5}  {'system':<36} {'B/s per node (lo, headers incl.)':>32}  ratio",
          flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        runs = {
            "grapevine (LAN profile)": [grapevine, "--nodes", str(size)] + window,
            "memberlist 0.8.5 lan()": [memberlist, "--nodes", str(size)] + window,
            "memberlist 0.8.5 lan(), probe 1 s": [memberlist, "--nodes", str(size),
                                                  "--probe-ms", "1000"] + window,
        }
        procs = {}
        try:
            for i, (name, cmd) in enumerate(runs.items()):
                ns = f"gv-idle-{i}"
                netns(ns)
                procs[name] = subprocess.Popen(
                    ["timeout", "-k", "5", str(args.idle + args.settle + 120),
                     "ip", "netns", "exec", ns] + cmd,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, proc in procs.items():
                out, _ = proc.communicate()
                found = re.search(r"lo_tx_bytes_per_node_per_s=([0-9.]+)", out)
                if proc.returncode != 0 or not found:
                    print(f"{name} at {size} nodes failed:\n{out}", file=sys.stderr)
                    sys.exit(1)
                rows.append((size, name, float(found.group(1))))
        finally:
            for i in range(len(runs)):
                subprocess.run(["ip", "netns", "del", f"gv-idle-{i}"], stderr=subprocess.DEVNULL)
        print_rows(size, rows)
    print("ratio: against memberlist with a 1 s probe interval (its cheapest LAN setting)")


def print_rows(size, rows):
    """Prints one size's rows as soon as they are in, so a later failure keeps them."""
    base = next(r for s, n, r in rows if s == size and n.startswith("memberlist") and
                "probe" in n)
    for s, name, rate in rows:
        if s == size:
            print(f"{s:>5}  {name:<36} {rate:>32.1f}  {rate / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
