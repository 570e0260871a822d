"""Per-layer and forward-pass time of MoE (`ep`, `tp`) and FoE (`gp`) on a cluster.

Per layer, per rank, the model adds up:
- compute: a roofline per operator, max(FLOPs / matmul rate, bytes / memory bandwidth), where bytes
  are the weights the rank reads (experts only if a token touches them) plus its KV-cache reads;
  operators: QKV+O projections, attention core, router, experts. Averaged over ranks;
- all_to_all / all_reduce: the collectives of FOE.md section 3 at mean per-rank sizes
  (collectives.py has the formulas);
- imbalance: the slowest rank's extra time over the mean, for compute and all-to-all, from the
  data-parallel split of sequences and the routing skew (imbalance.py);
- overhead: the cluster's fixed per-layer cost (kernel launches).
A forward pass is n_layers layers, plus the LM head on each sequence's last token, plus FoE's final
sum (sync="attention"), plus a per-step overhead. Collectives are not overlapped with compute (a
forward pass is a dependency chain), which is what the engines compared in the paper do.

Strategies and what they issue per layer (FOE.md section 3), P ranks:
- ep (MoE): attention data-parallel (sequences split over P, all heads), E/P experts per rank;
  all-to-all dispatch + combine of top_k rows of d_model per token, minus the 1/P that stays local,
  after a small all-to-all of per-expert row counts (uneven splits need them; `foe bench forward`
  issues it too).
- tp (MoE): attention head-parallel (n_heads/P query heads, ceil(n_kv/P) KV heads), all tokens
  replicated, E/P experts per rank; two all-reduces of [tokens, d_model].
- gp (FoE): H = n_kv groups, R = P/H ranks per group inside one node (or H/P groups per rank when
  P < H); sequences split over a group's R ranks; one all-reduce of [tokens/R, d_model] across the
  groups per layer (two for sync="both"), all-to-all of top_k/H rows inside the group when R > 1.
This file knows nothing about serving; serving.py calls `forward_time` once per engine step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from foe.config import ModelConfig
from foe.placement import ParallelDims
from foe.sim.batch import Batch, Segment
from foe.sim.collectives import Algo, allreduce, alltoall
from foe.sim.hardware import Cluster
from foe.sim.imbalance import RoutingStats, expected_imbalance

STRATEGIES = ("ep", "tp", "gp")
ARCH_OF = {"ep": "moe", "tp": "moe", "gp": "foe"}


@dataclass(frozen=True)
class Layout:
    """How a strategy places a model on P ranks."""

    strategy: str
    ranks: int
    dp: int  # data-parallel ways for attention (ep: P; gp: R; tp: 1)
    q_heads: int  # query heads per rank
    kv_heads: int  # KV heads per rank (replicated when ranks outnumber them)
    domains: int  # routing domains (MoE 1, FoE H)
    ranks_per_domain: int  # ranks that share one domain's experts
    a2a_ranks_per_node: int  # all-to-all extent (1 = none)
    a2a_nodes: int
    ar_ranks_per_node: int  # all-reduce extent
    ar_nodes: int
    allreduces: int  # per layer


def layout(cfg: ModelConfig, strategy: str, cluster: Cluster) -> Layout:
    """The placement `foe.parallel` would run (`foe.placement.ParallelDims`, validated by the code's own rules)
    in the cost model's terms. gp puts R = P / groups ranks on a group when there are more ranks than groups."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if cfg.arch != ARCH_OF[strategy]:
        raise ValueError(f"strategy {strategy} runs arch {ARCH_OF[strategy]}, config is {cfg.arch}")
    P, dpn, nodes, H = cluster.world, cluster.devices_per_node, cluster.nodes, cfg.n_kv_heads
    R = P // H if strategy == "gp" and P > H else 1
    dims = ParallelDims(strategy, P, R, dpn if nodes > 1 else None)
    dims.validate(cfg)
    calls = dims.collectives(cfg)
    reduces = (calls.get("all_reduce", 0) - (1 if strategy == "gp" and cfg.sync == "attention" else 0)) // cfg.n_layers
    if strategy == "ep":
        return Layout(strategy, P, P, cfg.n_heads, H, 1, P, dpn, nodes, 1, 1, reduces)
    if strategy == "tp":
        return Layout(strategy, P, 1, cfg.n_heads // P, H // P, 1, P, 1, 1, dpn, nodes, reduces)
    if R == 1:  # H/P whole groups per rank; each group is one domain on one rank
        g = H // P
        return Layout(strategy, P, 1, g * cfg.n_heads // H, g, H, 1, 1, 1, dpn, nodes, reduces)
    return Layout(strategy, P, R, cfg.n_heads // H, 1, H, R, R, 1, dpn // R, nodes, reduces)


@dataclass
class LayerTime:
    compute: float = 0.0
    all_to_all: float = 0.0
    all_reduce: float = 0.0
    imbalance: float = 0.0
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.all_to_all + self.all_reduce + self.imbalance + self.overhead


@dataclass
class ForwardTime:
    strategy: str
    batch: str
    tokens: int
    layer: LayerTime
    n_layers: int
    head: float
    final_sync: float
    step_overhead: float
    a2a_bytes_per_rank: float  # per layer, leaving one rank (mean), dispatch + combine
    allreduce_bytes_per_rank: float  # per layer, message size x count
    a2a_calls: int  # per layer: count exchange + dispatch + combine
    allreduce_calls: int  # per layer
    expert_imbalance: float  # max/mean routed rows per rank
    memory_per_rank: float  # bytes: weights + this batch's KV cache
    fits: bool
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.n_layers * self.layer.total + self.head + self.final_sync + self.step_overhead

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer"]["total"] = self.layer.total
        d["total"] = self.total
        return d


def _roofline(flops: float, bytes_: float, cluster: Cluster, rpn: int) -> float:
    return max(flops / cluster.flops(rpn), bytes_ / cluster.mem_bw(rpn))


def _attention_time(cfg: ModelConfig, segs: list[Segment], lay: Layout, cluster: Cluster, rpn: int) -> float:
    """Projections + attention core for the sequences one rank holds."""
    if not segs:
        return 0.0
    hd, d, b = cfg.head_dim, cfg.d_model, cluster.dtype_bytes
    tokens = sum(s.tokens for s in segs)
    w = d * (lay.q_heads * hd + 2 * lay.kv_heads * hd) + lay.q_heads * hd * d
    proj = _roofline(2 * tokens * w, w * b, cluster, rpn)
    flops = sum(s.n_seqs * 4 * lay.q_heads * hd * (s.q_len * s.ctx_len + s.q_len * (s.q_len + 1) / 2) for s in segs)
    kv = sum(s.n_seqs * (s.ctx_len + s.q_len) * 2 * lay.kv_heads * hd * b for s in segs)
    return proj + _roofline(flops, kv, cluster, rpn)


def _expert_time(cfg: ModelConfig, rows: float, tokens_in_domain: int, router_tokens: float, lay: Layout,
                 cluster: Cluster, rpn: int) -> float:
    """Router over the rank's tokens + its experts over `rows` routed rows (weights read once per
    touched expert: a token set of size T leaves an expert untouched with prob (1 - k/e)^T)."""
    d, F, b = cfg.d_model, cfg.expert_hidden, cluster.dtype_bytes
    e_dom = cfg.n_experts // lay.domains
    k_dom = cfg.top_k // lay.domains
    e_local = cfg.n_experts / lay.ranks  # E/P in every layout (gp with P < H: H/P whole groups)
    touched = e_local * (1 - (1 - k_dom / e_dom) ** tokens_in_domain)
    router_cols = e_dom * max(lay.domains // lay.ranks, 1)
    router = _roofline(2 * router_tokens * d * router_cols, d * router_cols * b, cluster, rpn)
    return router + _roofline(6 * rows * d * F, touched * 3 * d * F * b, cluster, rpn)


def forward_time(cfg: ModelConfig, strategy: str, cluster: Cluster, batch: Batch, routing: RoutingStats,
                 algo: Algo = "auto") -> ForwardTime:
    lay = layout(cfg, strategy, cluster)
    rpn = cluster.devices_per_node
    d, b, T = cfg.d_model, cluster.dtype_bytes, batch.tokens
    P = lay.ranks

    # Attention: per data-parallel shard; every rank of a shard does the same work.
    shards = batch.split(lay.dp)
    attn = [_attention_time(cfg, s, lay, cluster, rpn) for s in shards]
    tok = [sum(x.tokens for x in s) for s in shards]
    attn_mean, attn_max = sum(attn) / len(attn), max(attn)

    # Experts: mean rows per rank T*k/P in every strategy; the slowest rank has `imb` times that.
    rows_mean = T * cfg.top_k / P
    imb = expected_imbalance(T, cfg.n_experts, cfg.top_k, lay.domains, lay.ranks_per_domain,
                             round(routing.cv(cfg.arch), 4))
    router_tokens = T if lay.dp == 1 else T / lay.dp
    exp_mean = _expert_time(cfg, rows_mean, T, router_tokens, lay, cluster, rpn)
    exp_max = _expert_time(cfg, rows_mean * imb, T, max(tok) if lay.dp > 1 else T, lay, cluster, rpn)

    # All-to-all (ep: over all ranks; gp R>1: inside the group). Each token sends k_dom rows, 1/n stay.
    a2a_n = lay.a2a_ranks_per_node * lay.a2a_nodes
    a2a_mean = a2a_max = a2a_bytes = 0.0
    if a2a_n > 1:
        k_dom = cfg.top_k // lay.domains
        per_tok = k_dom * (1 - 1 / a2a_n) * d * b
        a2a_bytes = 2 * (T / lay.dp) * per_tok
        # Uneven splits need the row counts first: one small all-to-all of a count per expert.
        counts = alltoall(cfg.n_experts * 8, lay.a2a_ranks_per_node, lay.a2a_nodes, cluster)
        a2a_mean = counts + 2 * alltoall((T / lay.dp) * per_tok, lay.a2a_ranks_per_node, lay.a2a_nodes, cluster)
        # The slowest rank sends its shard's rows and receives its experts' rows.
        worst = max(max(tok) / max(T / lay.dp, 1e-9), imb)
        a2a_max = counts + 2 * alltoall(worst * (T / lay.dp) * per_tok, lay.a2a_ranks_per_node, lay.a2a_nodes, cluster)

    # each data-parallel shard all-reduces its own tokens, and the layer waits for the fullest shard (a lone
    # prompt on one rank all-reduces all of its tokens)
    ar_msg = max(tok) * d * b
    ar_one = allreduce(ar_msg, lay.ar_ranks_per_node, lay.ar_nodes, cluster, algo)
    layer = LayerTime(
        compute=attn_mean + exp_mean,
        all_to_all=a2a_mean,
        all_reduce=lay.allreduces * ar_one,
        imbalance=max(attn_max + exp_max - attn_mean - exp_mean, 0.0) + (a2a_max - a2a_mean),
        overhead=cluster.layer_overhead,
    )

    # LM head on each sequence's last token, on the rank(s) holding it.
    head_rows = max(sum(s.n_seqs for s in sh) for sh in shards)
    head = _roofline(2 * head_rows * d * cfg.vocab_size, d * cfg.vocab_size * b, cluster, rpn)
    final = ar_one if (strategy == "gp" and cfg.sync == "attention" and lay.ar_ranks_per_node * lay.ar_nodes > 1) else 0.0

    mem = weights_per_rank(cfg, lay) * b + max(
        sum(s.n_seqs * (s.ctx_len + s.q_len) for s in sh) for sh in shards) * 2 * cfg.n_layers * lay.kv_heads * cfg.head_dim * b
    return ForwardTime(
        strategy=strategy, batch=batch.describe(), tokens=T, layer=layer, n_layers=cfg.n_layers, head=head,
        final_sync=final, step_overhead=cluster.step_overhead, a2a_bytes_per_rank=a2a_bytes,
        allreduce_bytes_per_rank=lay.allreduces * ar_msg, a2a_calls=3 if a2a_n > 1 else 0,
        allreduce_calls=lay.allreduces if lay.ar_ranks_per_node * lay.ar_nodes > 1 else 0,
        expert_imbalance=imb, memory_per_rank=mem, fits=mem <= cluster.memory_bytes,
        details=dict(attention_mean=attn_mean, attention_max=attn_max, experts_mean=exp_mean,
                     experts_max=exp_max, layout=asdict(lay)))


def weights_per_rank(cfg: ModelConfig, lay: Layout) -> float:
    """Parameters a rank stores: its attention share, its experts, routers, embedding and head."""
    hd, d = cfg.head_dim, cfg.d_model
    attn = d * (lay.q_heads * hd + 2 * lay.kv_heads * hd) + lay.q_heads * hd * d
    experts = cfg.n_experts * 3 * d * cfg.expert_hidden / lay.ranks
    return cfg.n_layers * (attn + experts + cfg.n_experts * d) + 2 * cfg.vocab_size * d
