"""The shape of an emulated cluster: nodes of ranks, each rank a network namespace standing in for one GPU,
and the two link rates that matter to FoE and MoE: within a node (NVLink) and between nodes (InfiniBand).

Addresses: rank j of node k is 10.79.k.(j+1) in one 10.79.0.0/16 network on one bridge; a node is its /24,
which is what the traffic shaping classifies by (`shaping.py`). No torch here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

SUBNET = "10.79"
MAX_NODES, MAX_RANKS_PER_NODE = 200, 200  # an octet each


@dataclass(frozen=True)
class ClusterSpec:
    """`nodes` x `ranks_per_node` ranks; every rank sends and receives at `intra_mbit` Mbit/s to ranks of its
    own node and at `inter_mbit` to the others, each direction on its own (per-GPU NVLink and per-GPU NIC, as
    in an H100 node with one InfiniBand adapter per GPU). None: that class of traffic is not shaped."""

    name: str = "foe"
    nodes: int = 2
    ranks_per_node: int = 1
    intra_mbit: float | None = None
    inter_mbit: float | None = None
    mtu: int = 9000  # jumbo frames: veth carries ~1.5 Gbit/s here at 9000 against ~0.3 at 1500 (GSO off)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.name):
            raise ValueError(f"cluster name must be 1-8 lower-case letters or digits, starting with a letter; "
                             f"got {self.name!r}")
        if not 1 <= self.nodes <= MAX_NODES or not 1 <= self.ranks_per_node <= MAX_RANKS_PER_NODE:
            raise ValueError(f"nodes and ranks per node must be in 1..{MAX_NODES}, got {self.nodes} x "
                             f"{self.ranks_per_node}")
        for what, rate in (("intra-node", self.intra_mbit), ("inter-node", self.inter_mbit)):
            if rate is not None and not 0.01 <= rate <= 100_000:
                raise ValueError(f"the {what} rate must be in 0.01..100000 Mbit/s, got {rate}")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be in 576..65535, got {self.mtu}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{self.node_of(rank)}.{self.local_rank(rank) + 1}"

    def node_subnet(self, node: int) -> str:
        return f"{SUBNET}.{node}.0/24"

    def rank_ns(self, rank: int) -> str:
        return f"{self.name}-n{self.node_of(rank)}r{self.local_rank(rank)}"

    @property
    def fabric_ns(self) -> str:
        """The namespace holding the bridge every rank is plugged into (the switch)."""
        return f"{self.name}-fabric"

    @property
    def prefix(self) -> str:
        """Every namespace of this cluster starts with it (what `down` deletes)."""
        return f"{self.name}-"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        def rate(r: float | None) -> str:
            return "unshaped" if r is None else f"{r:g} Mbit/s"
        return (f"cluster {self.name}: {self.nodes} node(s) x {self.ranks_per_node} rank(s), one namespace per "
                f"rank ({SUBNET}.<node>.<rank+1>); per rank and direction: intra-node {rate(self.intra_mbit)}, "
                f"inter-node {rate(self.inter_mbit)}")
