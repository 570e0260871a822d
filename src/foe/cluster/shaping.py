"""Link rates with Linux traffic control: an HTB qdisc on each end of a rank's veth pair, with one class for
traffic within the rank's node and one for traffic to other nodes, told apart by the node's /24.

The rank's own end shapes what it sends (classified by destination), the fabric's end what it receives
(by source), so each direction has its own budget, as on NVLink and InfiniBand.

Bursts are one MTU: a token bucket with a deep burst would let a short collective pass at full speed after
every pause for compute, which is exactly when this emulation matters. What HTB cannot give:
- Latency. netem is not in this kernel, so a message's first packet leaves at once, and small messages
  see almost no cost from the link. Real links add microseconds per message (NVLink ~1-2 us, InfiniBand
  ~2-5 us between hosts); here there is only the software path's own latency, about 50-100 us through
  gloo and veth.
- Contention inside a switch. The bridge itself is not limited; each rank's link is.
"""

from __future__ import annotations

import subprocess

from foe.cluster.topology import ClusterSpec

UNSHAPED_MBIT = 100_000.0  # a class left unshaped gets this ceiling: far above what veth carries here


def tc(*args: str) -> None:
    r = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"tc {' '.join(args)}: {r.stderr.strip()}")


def htb_class_args(rate_mbit: float, mtu: int) -> list[str]:
    """rate = ceil, with one-MTU bursts (see the module docstring) and a quantum of one MTU."""
    rate = f"{rate_mbit * 1000:.0f}kbit"
    burst = str(mtu + 100)  # bytes; a little over one frame with its link-layer header
    return ["rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", str(mtu + 100)]


def shape_link(ns: str, dev: str, node_subnet: str, match: str, spec: ClusterSpec) -> None:
    """Shape `dev` in namespace `ns`: packets whose `match` address (dst or src) lies in node_subnet at
    spec.intra_mbit, the rest at spec.inter_mbit. Nothing when neither rate is set."""
    if spec.intra_mbit is None and spec.inter_mbit is None:
        return
    base = ["-n", ns]
    tc(*base, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20")
    tc(*base, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
       *htb_class_args(spec.intra_mbit or UNSHAPED_MBIT, spec.mtu))
    tc(*base, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb",
       *htb_class_args(spec.inter_mbit or UNSHAPED_MBIT, spec.mtu))
    tc(*base, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
       match, node_subnet, "flowid", "1:10")


def link_counters(ns: str, dev: str) -> str:
    """What the shaped classes of dev have sent, e.g. "intra 1.2 MB, inter 0.3 MB (12 packets delayed)"."""
    r = subprocess.run(["tc", "-n", ns, "-s", "class", "show", "dev", dev], capture_output=True, text=True,
                       timeout=30)
    if r.returncode or not r.stdout.strip():
        return "unshaped"
    sent: dict[str, int] = {}
    cls = None
    for line in r.stdout.splitlines():
        words = line.split()
        if words[:2] == ["class", "htb"]:
            cls = {"1:10": "intra", "1:20": "inter"}.get(words[2])
        elif words[:1] == ["Sent"] and cls:
            sent[cls] = int(words[1])
    return ", ".join(f"{k} sent {v / 1e6:.2f} MB" for k, v in sent.items())
