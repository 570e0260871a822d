"""Which rank holds what: a validated description of a parallel launch (`ParallelDims`), and the
collectives it issues. Torch-free: `foe.parallel` applies it to a model, and the cost model (`foe.sim`)
predicts from it, so the sim models exactly the layouts the code runs.

Rank layout for `gp` (FoE): P = S x R ranks, S group-sets of R ranks; set i holds groups
[i*G/S, (i+1)*G/S) and its R ranks share that group's sequences (data parallel) and experts (expert
parallel, all-to-all inside the set). Ranks are numbered set-major (rank = i*R + r) so that a set sits in
one node; the all-reduce that sums the groups runs across the ranks with the same r, one per set.
"""

from __future__ import annotations

from dataclasses import dataclass

from foe.config import ModelConfig

STRATEGIES = ("none", "ep", "tp", "gp")
STRATEGY_ARCH = {"ep": "moe", "tp": "moe", "gp": "foe"}


@dataclass(frozen=True)
class ParallelDims:
    strategy: str = "none"
    world_size: int = 1
    ranks_per_group: int = 1  # gp: R, ranks sharing one FoE group (R > 1 = the multi-node case)
    ranks_per_node: int | None = None  # node layout for accounting; None = one node

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.world_size < 1 or self.ranks_per_group < 1:
            raise ValueError("world_size and ranks_per_group must be >= 1")
        if self.strategy == "none" and self.world_size != 1:
            raise ValueError("strategy 'none' runs on one process; pick ep, tp or gp for several")
        if self.ranks_per_group > 1 and self.strategy != "gp":
            raise ValueError("ranks_per_group applies to the gp strategy only")
        if self.world_size % self.ranks_per_group:
            raise ValueError(f"world_size {self.world_size} is not a multiple of ranks_per_group {self.ranks_per_group}")
        rpn = self.node_size
        if self.world_size % rpn:
            raise ValueError(f"world_size {self.world_size} is not a multiple of ranks_per_node {rpn}")
        if self.strategy == "gp" and rpn % self.ranks_per_group:
            raise ValueError(f"ranks_per_node {rpn} must be a multiple of ranks_per_group {self.ranks_per_group}: "
                             "a group's ranks share a node")

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or self.world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.node_size

    def node_of(self, rank: int) -> int:
        return rank // self.node_size

    @property
    def num_sets(self) -> int:
        """gp: group-sets (ranks holding different groups); the all-reduce spans this many ranks."""
        return self.world_size // self.ranks_per_group

    @property
    def dp_size(self) -> int:
        """Data-parallel shards of the sequences: ranks in the same shard get the same inputs."""
        return {"ep": self.world_size, "gp": self.ranks_per_group}.get(self.strategy, 1)

    def dp_rank(self, rank: int) -> int:
        return {"ep": rank, "gp": rank % self.ranks_per_group}.get(self.strategy, 0)

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ValueError naming the problem when this launch cannot run `cfg`."""
        s, P = self.strategy, self.world_size
        if s == "none":
            return
        if cfg.arch != STRATEGY_ARCH[s]:
            other = "gp" if cfg.arch == "foe" else "ep or tp"
            raise ValueError(f"strategy {s!r} runs {STRATEGY_ARCH[s].upper()} models, but the model is "
                             f"{cfg.arch.upper()}; use {other}")
        if s == "ep" and cfg.n_experts % P:
            raise ValueError(f"ep over {P} ranks needs n_experts ({cfg.n_experts}) divisible by {P}")
        if s == "tp":
            if cfg.n_kv_heads % P:
                raise ValueError(f"tp over {P} ranks needs n_kv_heads ({cfg.n_kv_heads}) divisible by {P}")
            if cfg.n_experts % P:
                raise ValueError(f"tp over {P} ranks needs n_experts ({cfg.n_experts}) divisible by {P}")
        if s == "gp":
            G, S, R = cfg.num_groups, self.num_sets, self.ranks_per_group
            if R == 1 and G % P:
                raise ValueError(f"gp over {P} ranks needs the {G} FoE groups (n_kv_heads) divisible by {P} "
                                 f"(or {P} = groups x ranks_per_group)")
            if R > 1 and S != G:
                raise ValueError(f"gp with ranks_per_group={R} needs world_size = groups x R = {G} x {R} = "
                                 f"{G * R}, got {P}")
            if R > 1 and cfg.experts_per_group % R:
                raise ValueError(f"gp with ranks_per_group={R} needs experts per group ({cfg.experts_per_group}) "
                                 f"divisible by {R}")

    def collectives(self, cfg: ModelConfig) -> dict[str, int]:
        """The calls one forward issues on each rank, by op (as `foe.parallel`'s ledger names them):
        all_reduce, all_to_all (dispatch and combine) and all_to_all_counts (the row-count exchange)."""
        n, s = cfg.n_layers, self.strategy
        a2a = s == "ep" or (s == "gp" and self.ranks_per_group > 1)
        if s == "tp":
            reduces = 2 * n
        elif s == "gp" and self.num_sets > 1:
            reduces = (2 if cfg.sync == "both" else 1) * n + (1 if cfg.sync == "attention" else 0)
        else:
            reduces = 0
        out = {"all_reduce": reduces, "all_to_all": 2 * n if a2a else 0, "all_to_all_counts": n if a2a else 0}
        return {op: k for op, k in out.items() if k}

    def describe(self, cfg: ModelConfig | None = None) -> str:
        """E.g. "gp on 2 rank(s), 1 node(s) of 2: 1 all-reduce across groups per layer (+1 before the head)";
        with `cfg`, the all-reduces its sync mode adds are counted."""
        sync = cfg.sync if cfg is not None else "attention"
        gp_reduces = {"attention": "1 all-reduce across groups per layer, +1 before the head",
                      "moe": "1 all-reduce across groups per layer", "both": "2 all-reduces across groups per layer"}
        per_layer = {
            "none": "no collectives",
            "ep": "2 all-to-all (dispatch, combine) over all ranks + a count exchange per layer",
            "tp": "2 all-reduce (after attention, after the MoE) over all ranks per layer",
            "gp": gp_reduces[sync] + ("; 2 all-to-all inside each group (+ count exchange) per layer"
                                      if self.ranks_per_group > 1 else ""),
        }[self.strategy]
        return f"{self.strategy} on {self.world_size} rank(s), {self.num_nodes} node(s) of {self.node_size}: {per_layer}"
