"""Bringing an emulated cluster up and down with iproute2: a namespace per rank, a veth pair from each into
the fabric namespace's bridge, the rank's addresses, and the shaping of both ends (`shaping.py`).

Nothing leaves the cluster: the fabric's bridge has no port outside it and no namespace has a default
route, so traffic goes only between these namespaces. `tear_down` kills what runs inside and deletes every
namespace whose name starts with the cluster's prefix; it is idempotent, so it is safe in `finally`, in
signal handlers and by hand (`foe cluster down`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from foe.cluster.shaping import shape_link
from foe.cluster.topology import ClusterSpec

BRIDGE = "br0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`; RuntimeError naming the command and its error when check and it fails."""
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RuntimeError("the `ip` command (iproute2) is not installed") from None
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def check_permitted() -> None:
    """ValueError saying why when this process cannot create namespaces (not root, or a container that
    forbids it)."""
    if os.geteuid() != 0:
        raise ValueError("an emulated cluster needs root: it creates network namespaces and shapes their links "
                         "(run as root, or in a VM or container where you are)")
    probe = f"foeprobe{os.getpid()}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode:
        raise ValueError(f"creating a network namespace is not permitted here: {r.stderr.strip()}")
    ip("netns", "del", probe, check=False)


def namespaces(prefix: str) -> list[str]:
    """The namespaces whose name starts with prefix."""
    out = ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in out if line.strip() and line.split()[0].startswith(prefix)]


def bring_up(spec: ClusterSpec) -> None:
    """Create the cluster; on any failure, tear down what was made and re-raise."""
    check_permitted()
    if existing := namespaces(spec.prefix):
        raise ValueError(f"namespaces of a cluster named {spec.name!r} already exist ({', '.join(existing[:4])}"
                         f"{', ...' if len(existing) > 4 else ''}): `foe cluster down --name {spec.name}` first")
    try:
        _build(spec)
    except BaseException:
        tear_down(spec.name)
        raise


def _build(spec: ClusterSpec) -> None:
    fab = spec.fabric_ns
    ip("netns", "add", fab)
    ip("-n", fab, "link", "set", "lo", "up")
    ip("-n", fab, "link", "add", BRIDGE, "type", "bridge")
    ip("-n", fab, "link", "set", BRIDGE, "up")
    tag = f"fc{os.getpid() % 100000}"
    for r in range(spec.world_size):
        ns, port = spec.rank_ns(r), f"p{spec.node_of(r)}x{spec.local_rank(r)}"
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        # made in this namespace under temporary names, then moved and renamed (names are per namespace)
        # GSO off (one segment per packet): the shaper charges whole super-packets of up to 64 KB, which
        # would let that much through at once whatever the rate
        one = ("mtu", str(spec.mtu), "gso_max_segs", "1", "gso_max_size", str(spec.mtu))
        ip("link", "add", f"{tag}a", *one, "type", "veth", "peer", "name", f"{tag}b", *one)
        ip("link", "set", f"{tag}a", "netns", ns)
        ip("link", "set", f"{tag}b", "netns", fab)
        ip("-n", ns, "link", "set", f"{tag}a", "name", "eth0")
        ip("-n", fab, "link", "set", f"{tag}b", "name", port)
        ip("-n", ns, "addr", "add", f"{spec.address(r)}/16", "dev", "eth0")
        ip("-n", fab, "link", "set", port, "master", BRIDGE)
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", fab, "link", "set", port, "up")
        subnet = spec.node_subnet(spec.node_of(r))
        shape_link(ns, "eth0", subnet, "dst", spec)  # what the rank sends
        shape_link(fab, port, subnet, "src", spec)  # what it receives


def tear_down(name: str) -> list[str]:
    """Kill every process in the cluster's namespaces and delete them; the names deleted (none: nothing
    was there)."""
    prefix = ClusterSpec(name=name).prefix
    gone = namespaces(prefix)
    for ns in gone:
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in gone:
        for _ in range(50):  # a namespace with a process still exiting is deleted once it has gone
            if ip("netns", "del", ns, check=False).returncode == 0 or ns not in namespaces(prefix):
                break
            time.sleep(0.1)
    return gone


def exec_argv(ns: str, argv: list[str]) -> list[str]:
    """argv run inside namespace ns."""
    return ["ip", "netns", "exec", ns, *argv]
