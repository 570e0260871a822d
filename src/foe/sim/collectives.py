"""Alpha-beta cost formulas for the collectives the strategies issue: all-reduce and all-to-all.

Assumptions (stated once, used everywhere):
- Every device sends and receives at its link's achievable bandwidth at the same time (full duplex);
  NVSwitch gives every pair of devices in a node the full per-device NVLink bandwidth (no
  contention inside a node); each device has its own NIC, so inter-node traffic of different
  devices does not share a link.
- A collective costs its link's fixed `latency` once, plus `hop` per algorithm step.
- Ring all-reduce of n bytes over p ranks: 2(p-1) steps, each moving n/p bytes per rank:
  T = latency + 2(p-1) hop + 2 (p-1)/p n / bw.
- Tree all-reduce (pipelined reduce then broadcast along a binary tree, NCCL-style):
  T = latency + 2 ceil(log2 p) hop + 2 n / bw  (better for small n, worse for large).
- `auto` takes the faster of the two, as NCCL's tuner does.
- An all-reduce whose ranks span m nodes with q ranks in each is hierarchical: intra-node
  reduce-scatter (q ranks), inter-node all-reduce of n/q bytes between the m nodes (each of the q
  devices drives its own NIC in parallel), intra-node all-gather.
- All-to-all: each rank sends `bytes_out` (what leaves it, the local share already removed),
  spread evenly over its p-1 peers; peers in the node go over NVLink, the rest over the NIC, in
  parallel: T = latency + (p-1) hop + max(intra bytes / intra bw, inter bytes / inter bw), each bw times
  the cluster's a2a_bandwidth_factor (1 = full duplex, as NCCL; gloo's is fitted).
This file knows nothing of models or strategies.
"""

from __future__ import annotations

import math
from typing import Literal

from foe.sim.hardware import Cluster, Link

Algo = Literal["ring", "tree", "auto"]
ALGOS = ("ring", "tree", "auto")


def ring_allreduce(n_bytes: float, p: int, link: Link) -> float:
    if p <= 1:
        return 0.0
    return link.latency + 2 * (p - 1) * link.hop + 2 * (p - 1) / p * n_bytes / link.bw


def tree_allreduce(n_bytes: float, p: int, link: Link) -> float:
    if p <= 1:
        return 0.0
    return link.latency + 2 * math.ceil(math.log2(p)) * link.hop + 2 * n_bytes / link.bw


def flat_allreduce(n_bytes: float, p: int, link: Link, algo: Algo) -> float:
    if algo not in ALGOS:
        raise ValueError(f"all-reduce algorithm must be one of {ALGOS}, got {algo!r}")
    if algo == "ring":
        return ring_allreduce(n_bytes, p, link)
    if algo == "tree":
        return tree_allreduce(n_bytes, p, link)
    return min(ring_allreduce(n_bytes, p, link), tree_allreduce(n_bytes, p, link))


def _half_ring(n_bytes: float, q: int, link: Link) -> float:
    """Reduce-scatter or all-gather over q ranks: half a ring all-reduce."""
    if q <= 1:
        return 0.0
    return link.latency + (q - 1) * link.hop + (q - 1) / q * n_bytes / link.bw


def allreduce(n_bytes: float, ranks_per_node: int, nodes: int, cluster: Cluster, algo: Algo = "auto") -> float:
    """Time of one all-reduce of `n_bytes` per rank over `ranks_per_node` ranks in each of `nodes` nodes."""
    if n_bytes < 0 or ranks_per_node < 1 or nodes < 1:
        raise ValueError("allreduce needs n_bytes >= 0, ranks_per_node >= 1, nodes >= 1")
    if nodes == 1:
        return flat_allreduce(n_bytes, ranks_per_node, cluster.intra, algo)
    q = ranks_per_node
    return (2 * _half_ring(n_bytes, q, cluster.intra)
            + flat_allreduce(n_bytes / q, nodes, cluster.inter, algo))


def alltoall(bytes_out: float, ranks_per_node: int, nodes: int, cluster: Cluster) -> float:
    """Time of one all-to-all where each rank sends `bytes_out` bytes to the others, evenly spread."""
    if bytes_out < 0 or ranks_per_node < 1 or nodes < 1:
        raise ValueError("alltoall needs bytes_out >= 0, ranks_per_node >= 1, nodes >= 1")
    p = ranks_per_node * nodes
    if p <= 1:
        return 0.0
    intra_share = (ranks_per_node - 1) / (p - 1)
    f = cluster.a2a_bandwidth_factor
    t_intra = bytes_out * intra_share / (cluster.intra.bw * f)
    t_inter = bytes_out * (1 - intra_share) / (cluster.inter.bw * f) if nodes > 1 else 0.0
    link = cluster.inter if nodes > 1 else cluster.intra
    return link.latency + (p - 1) * link.hop + max(t_intra, t_inter)
