#!/usr/bin/env python3
"""A slow, obviously-correct stand-in for `gracewatch status|watch --json`,
built on `ss -tanp` run inside every named network namespace (/run/netns).

It exists to check the end-to-end tests themselves, independently of the
binary under test:

    GRACEWATCH_BIN=tests/programs/ss_oracle.py cargo test -p gracewatch-e2e

If a test fails against the oracle, the test (or the harness) is wrong; if it
passes here and fails against gracewatch, look at gracewatch. Limits: it only
sees named namespaces, polls (so `watch` may miss connections shorter than
its poll interval), and reports `oldest_live_ms` as 0 for any live process.

Live = ESTABLISHED or CLOSE-WAIT sockets whose local address matches a
listener in the same namespace (inbound), owned by the processes `ss` names.
`ss` never shows sockets in CLOSE (reset), which are not live either.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.03


def usage(msg):
    print(f"ss_oracle: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    if not argv or argv[0] not in ("status", "watch"):
        usage("expected `status` or `watch`")
    pids, ports, as_json = set(), set(), False
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--pid":
            pids.add(int(next(rest)))
        elif arg == "--port":
            ports.add(int(next(rest)))
        elif arg == "--json":
            as_json = True
        else:
            usage(f"unknown argument {arg!r}")
    return argv[0], pids, ports, as_json


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def bare_ip(host):
    host = host.strip("[]")
    return host[7:] if host.startswith("::ffff:") else host


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


CONTAINER = re.compile(r"(?:^|[/:])(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?(?=$|[/:])")
POD_SYSTEMD = re.compile(r"kubepods[^/:]*-pod([0-9a-f_]{32,36})\.slice(?=$|[/:])")
POD_CGROUPFS = re.compile(r"/kubepods(?:\.[^/]*)?/(?:.*/)?pod([0-9a-f-]{32,36})(?=$|/)")


def place(pid):
    """(cgroup, container_id, pod_uid) from /proc/PID/cgroup's v2 line."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None, None, None
    path = next((l[3:] for l in text.split("\n") if l.startswith("0::")), None)
    if not path or path == "/" or not path.startswith("/") or len(path.encode()) > 4096:
        return None, None, None
    ids = CONTAINER.findall(path)
    pods = [u.replace("_", "-") for u in POD_SYSTEMD.findall(path)] + POD_CGROUPFS.findall(path)
    return path, (ids[-1] if ids else None), (pods[-1] if pods else None)


def scan():
    """Every TCP socket in every named namespace."""
    sockets = []
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    for name in names:
        try:
            inode = os.stat(f"/run/netns/{name}").st_ino
        except OSError:
            continue  # deleted meanwhile
        out = subprocess.run(["ip", "netns", "exec", name, "ss", "-tanpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            f = line.split(None, 5)
            if len(f) < 5:
                continue
            users = [int(p) for p in re.findall(r"pid=(\d+),fd=\d+", f[5] if len(f) > 5 else "")]
            local = f[3]
            if local.startswith("*:"):  # dual-stack wildcard
                local = "[::]" + local[1:]
            sockets.append(dict(netns=inode, state=f[0], recv_q=int(f[1]), local=local, peer=f[4], users=users))
    return sockets


def build(sockets, pids, ports, totals):
    """(status, live connection keys -> listener key)."""
    listeners = []
    for s in sockets:
        if s["state"] != "LISTEN":
            continue
        host, port = split_addr(s["local"])
        listeners.append(dict(
            netns=s["netns"], address=s["local"], family="ipv6" if s["local"].startswith("[") else "ipv4",
            host=bare_ip(host), port=port, holders={pid: 0 for pid in s["users"]}, accept_queue=s["recv_q"],
        ))
    procs = {}

    def proc(pid):
        return procs.setdefault(pid, dict(pid=pid, comm=comm(pid), live=0, listeners=[]))

    live = {}
    for s in sockets:
        if s["state"] not in ("ESTAB", "CLOSE-WAIT"):
            continue
        host, port = split_addr(s["local"])
        match = [l for l in listeners if l["netns"] == s["netns"] and l["port"] == port
                 and l["host"] in (bare_ip(host), "0.0.0.0", "::")]
        if not match:
            continue  # outbound
        best = max(match, key=lambda l: l["host"] == bare_ip(host))
        for pid in s["users"]:
            best["holders"][pid] = best["holders"].get(pid, 0) + 1
            proc(pid)["live"] += 1
            live[(s["netns"], s["local"], s["peer"], pid)] = (best["netns"], best["address"])
    for l in listeners:
        for pid in l["holders"]:
            proc(pid)["listeners"].append(l["address"])

    shown = sorted((l for l in listeners if not ports or l["port"] in ports), key=lambda l: (l["netns"], l["address"]))
    out_listeners = [dict(
        netns=l["netns"], address=l["address"], family=l["family"],
        holders=[dict(pid=pid, comm=comm(pid), live=n) for pid, n in sorted(l["holders"].items())],
        accept_queue=l["accept_queue"], accepted_total=totals["listener_accepted"].get((l["netns"], l["address"]), 0),
        queue_drops_total=0,
        generations=[dict(pid=pid, comm=comm(pid), role="serving", role_since_ms=0, live=procs[pid]["live"] if pid in procs else 0)
                     for pid in sorted(l["holders"])],
    ) for l in shown]
    out_procs = []
    for pid, p in sorted(procs.items()):
        if pids and pid not in pids:
            continue
        if ports and not any(pid in l["holders"] for l in shown):
            continue
        cgroup, container_id, pod_uid = place(pid)
        out_procs.append(dict(
            pid=pid, comm=p["comm"], live=p["live"], listeners=p["listeners"],
            accepted_total=totals["accepted"].get(pid, 0), closed_total=totals["closed"].get(pid, 0),
            oldest_live_ms=0 if p["live"] else None, role="serving", role_since_ms=0,
            cgroup=cgroup, container_id=container_id, pod_uid=pod_uid,
        ))
    status = dict(schema="gracewatch.status.v2", uptime_ms=0, processes=out_procs, listeners=out_listeners, lost_events=0, map_full_total=0)
    return status, live


def main():
    cmd, pids, ports, as_json = parse_args(sys.argv[1:])
    totals = dict(accepted={}, closed={}, listener_accepted={})
    if cmd == "status":
        status, _ = build(scan(), pids, ports, totals)
        if as_json:
            print(json.dumps(status))
        elif not status["listeners"] and not status["processes"]:
            print("no listener or process matches")
        else:
            print(json.dumps(status, indent=2))
        return
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    before, last = None, None
    while True:
        sockets = scan()
        status, live = build(sockets, pids, ports, totals)
        if before is not None:
            new = [k for k in live if k not in before]
            gone = [k for k in before if k not in live]
            for key in new:
                totals["accepted"][key[3]] = totals["accepted"].get(key[3], 0) + 1
                totals["listener_accepted"][live[key]] = totals["listener_accepted"].get(live[key], 0) + 1
            for key in gone:
                totals["closed"][key[3]] = totals["closed"].get(key[3], 0) + 1
            if new or gone:
                status, live = build(sockets, pids, ports, totals)
        before = live
        line = json.dumps(status)
        if line != last:
            print(line, flush=True)
            last = line
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main()
