"""Cluster descriptions for the cost model: per-device rates, links and collective latencies.

A `Cluster` is nodes x devices_per_node identical devices. Each device has a peak matmul rate and a
memory bandwidth (with achievable-fraction factors), two links (intra-node: NVLink/NVSwitch or
loopback; inter-node: one NIC per device), and fixed per-collective latencies. Presets hold
published figures (sources in docs/cost-model.md); `cpu-gloo` describes this 2-core machine and is
what `foe sim calibrate` fits. This file holds numbers only: the formulas live in collectives.py and
cost_model.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Link:
    """One direction of a device's link: bytes/s it can send (and, concurrently, receive)."""

    bandwidth: float  # bytes/s per device per direction, peak
    efficiency: float  # achievable fraction of `bandwidth` for large messages (NCCL bus bw / peak)
    latency: float  # s, fixed cost of one collective call (launch + first synchronisation)
    hop: float  # s, added per algorithm step (ring step, tree level, a2a peer)

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or not 0 < self.efficiency <= 1 or self.latency < 0 or self.hop < 0:
            raise ValueError(f"invalid Link {self}: bandwidth > 0, 0 < efficiency <= 1, latencies >= 0")

    @property
    def bw(self) -> float:
        """Achievable bytes/s."""
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    matmul_flops: float  # FLOP/s per device, peak dense at `dtype_bytes`
    matmul_efficiency: float  # achievable fraction for large GEMMs
    mem_bandwidth: float  # bytes/s per device, peak
    mem_efficiency: float
    memory_bytes: float  # per device
    intra: Link
    inter: Link
    dtype_bytes: int = 2  # weights, activations and KV cache
    layer_overhead: float = 0.0  # s per layer per forward: kernel launches not hidden (no graphs)
    step_overhead: float = 0.0  # s per engine step: scheduling, sampling, host sync
    cores_per_node: int = 0  # CPU presets: ranks beyond this share cores (0 = no sharing)
    # all-to-all's bandwidth over the link's: 1 for NCCL (full duplex); fitted for gloo, whose all-to-all
    # of large messages was measured not to overlap sending with receiving (docs/emulated-cluster.md)
    a2a_bandwidth_factor: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: nodes and devices_per_node must be >= 1")
        if self.matmul_flops <= 0 or self.mem_bandwidth <= 0 or self.memory_bytes <= 0:
            raise ValueError(f"cluster {self.name!r}: rates and memory must be positive")
        if not (0 < self.matmul_efficiency <= 1 and 0 < self.mem_efficiency <= 1):
            raise ValueError(f"cluster {self.name!r}: efficiencies must be in (0, 1]")
        if not 0 < self.a2a_bandwidth_factor <= 2:
            raise ValueError(f"cluster {self.name!r}: a2a_bandwidth_factor must be in (0, 2]")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError(f"cluster {self.name!r}: dtype_bytes must be 1, 2 or 4")

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def compute_share(self, ranks_per_node: int) -> float:
        """Fraction of a device's rate one rank gets: < 1 only when CPU ranks outnumber cores."""
        if self.cores_per_node <= 0 or ranks_per_node <= self.cores_per_node:
            return 1.0
        return self.cores_per_node / ranks_per_node

    def flops(self, ranks_per_node: int | None = None) -> float:
        return self.matmul_flops * self.matmul_efficiency * self.compute_share(ranks_per_node or self.devices_per_node)

    def mem_bw(self, ranks_per_node: int | None = None) -> float:
        return self.mem_bandwidth * self.mem_efficiency * self.compute_share(ranks_per_node or self.devices_per_node)

    def with_nodes(self, nodes: int) -> "Cluster":
        return dataclasses.replace(self, nodes=nodes)

    def replace(self, **changes: Any) -> "Cluster":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cluster":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Cluster fields: {unknown}")
        d = dict(d)
        for k in ("intra", "inter"):
            if isinstance(d.get(k), dict):
                d[k] = Link(**d[k])
        return cls(**d)


GB = 1e9
TB = 1e12
US = 1e-6

# NVIDIA H100 SXM5 datasheet: BF16 Tensor Core 1,979 TFLOP/s *with sparsity* -> 989 dense; HBM3
# 3.35 TB/s, 80 GB; NVLink 4 900 GB/s total = 450 GB/s per direction through NVSwitch. DGX H100: one
# ConnectX-7 NDR 400 Gb/s (50 GB/s per direction) per GPU. Efficiencies: large BF16 GEMMs reach
# ~65-75% of dense peak; STREAM-like HBM reads ~85-90%; nccl-tests all-reduce bus bandwidth
# ~360 GB/s on NVLink (0.8) and ~45 GB/s on NDR (0.9). Latencies: nccl-tests small-message
# all-reduce is a few us on NVLink without CUDA graphs, ~15-25 us across IB (see docs).
_H100_INTRA = Link(bandwidth=450 * GB, efficiency=0.8, latency=8 * US, hop=0.7 * US)
_NDR_INTER = Link(bandwidth=50 * GB, efficiency=0.9, latency=15 * US, hop=3 * US)

CLUSTERS: dict[str, Cluster] = {
    "h100": Cluster(
        name="h100", nodes=1, devices_per_node=8, matmul_flops=989 * TB, matmul_efficiency=0.7,
        mem_bandwidth=3.35 * TB, mem_efficiency=0.85, memory_bytes=80 * GB,
        intra=_H100_INTRA, inter=_NDR_INTER, dtype_bytes=2, layer_overhead=20 * US, step_overhead=2e-3,
        source="NVIDIA H100 SXM5 datasheet; DGX H100 user guide (ConnectX-7 NDR 400 Gb/s per GPU)"),
    "h200": Cluster(
        name="h200", nodes=1, devices_per_node=8, matmul_flops=989 * TB, matmul_efficiency=0.7,
        mem_bandwidth=4.8 * TB, mem_efficiency=0.85, memory_bytes=141 * GB,
        intra=_H100_INTRA, inter=_NDR_INTER, dtype_bytes=2, layer_overhead=20 * US, step_overhead=2e-3,
        source="NVIDIA H200 SXM datasheet (same NVLink 4 / NDR fabric as DGX H100)"),
    # This machine: 2 cores, fp32, gloo over loopback. Starting values from ENVIRONMENT.md section 2
    # (1-thread fp32 matmul ~130-157 GFLOP/s, 1-thread copy 10 GB/s, 2-rank gloo ~0.3 ms per call,
    # ~1-2 GB/s payload); `foe sim calibrate` replaces them with fitted ones.
    "cpu-gloo": Cluster(
        name="cpu-gloo", nodes=1, devices_per_node=2, matmul_flops=140 * GB, matmul_efficiency=1.0,
        mem_bandwidth=10 * GB, mem_efficiency=1.0, memory_bytes=20 * GB,
        intra=Link(bandwidth=1.5 * GB, efficiency=1.0, latency=300 * US, hop=50 * US),
        inter=Link(bandwidth=1.5 * GB, efficiency=1.0, latency=300 * US, hop=50 * US),
        dtype_bytes=4, layer_overhead=0.0, step_overhead=0.0, cores_per_node=2,
        source="ENVIRONMENT.md section 2 (measured on this machine), refined by foe sim calibrate"),
}

# The GPU presets' constants that no datasheet gives, as plausible ranges: `foe sim serve --bands` re-runs the
# projection at each end of each range (one at a time) and reports every ratio as a band.
UNCERTAIN: dict[str, tuple[float, float, str]] = {
    "matmul_efficiency": (0.5, 0.8, "large BF16 GEMMs reach about this fraction of dense peak on H100"),
    "layer_overhead": (5 * US, 40 * US, "kernel launches per layer not hidden (with and without CUDA graphs)"),
    "step_overhead": (0.5e-3, 4e-3, "scheduling, sampling and host sync per engine step"),
    "inter_hop": (1 * US, 5 * US, "per InfiniBand peer or ring step"),
}


def with_constant(cluster: Cluster, name: str, value: float) -> Cluster:
    """The cluster with one of the UNCERTAIN constants set."""
    if name == "inter_hop":
        return cluster.replace(inter=dataclasses.replace(cluster.inter, hop=value))
    if name == "matmul_efficiency":
        return cluster.replace(matmul_efficiency=value)
    return cluster.replace(**{name: value})


CALIBRATED_FILE = Path(__file__).parent / "data" / "cpu_gloo_calibrated.json"


def get_cluster(name_or_path: str, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """A preset name (`h100`, `h200`, `cpu-gloo`) or a JSON file written by `Cluster.to_dict`.

    `cpu-gloo` uses the calibrated values when `foe sim calibrate` has written them."""
    if name_or_path in CLUSTERS:
        c = CLUSTERS[name_or_path]
        if name_or_path == "cpu-gloo" and CALIBRATED_FILE.exists():
            c = Cluster.from_dict(json.loads(CALIBRATED_FILE.read_text())["cluster"])
    elif Path(name_or_path).is_file():
        try:
            c = Cluster.from_dict(json.loads(Path(name_or_path).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"cluster file {name_or_path}: {e}") from None
    else:
        raise ValueError(f"unknown cluster {name_or_path!r}; choose from {sorted(CLUSTERS)} or give a JSON file")
    changes: dict[str, Any] = {}
    if nodes is not None:
        changes["nodes"] = nodes
    if devices_per_node is not None:
        changes["devices_per_node"] = devices_per_node
    return c.replace(**changes) if changes else c
