"""`foe bench forward`: the paper's forward-pass latency experiment on this machine.

Synthetic forward passes at a sweep of batch sizes, for MoE `ep`, MoE `tp` and FoE `gp` side by side in
one run on the same ranks, with the same model size and the same global batch. Per (strategy, mode,
batch) it reports latency (median, p10, p90 of the slowest rank), bytes per token per layer (intra/inter
node), collective calls per layer, time spent in collectives and expert load balance (max/mean rows per
rank). Prefill times a forward over `seq_len` new tokens per sequence; decode times one new token per
sequence over a KV cache holding `context_len` tokens. Timing is wall clock: on a shared CPU with gloo,
bytes and calls are the portable figures and the time is reported beside them.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from foe.config import ModelConfig
from foe.model.precision import dtype_named
from foe.parallel import ParallelDims, init_distributed, parallelize, run_ranks

STRATEGY_ARCH = {"ep": "moe", "tp": "moe", "gp": "foe"}


@dataclass(frozen=True)
class ForwardBenchConfig:
    preset: str = "small"
    nproc: int = 2
    strategies: tuple[str, ...] = ("ep", "tp", "gp")
    modes: tuple[str, ...] = ("prefill", "decode")
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    seq_len: int = 64  # prefill tokens per sequence
    context_len: int = 256  # decode: tokens already in the KV cache
    warmup: int = 2
    repeats: int = 7
    ranks_per_node: int | None = None
    ranks_per_group: int = 1  # gp only (the multi-node layout)
    seed: int = 0
    model_overrides: dict = field(default_factory=dict)
    dtype: str = "float32"  # of weights, activations, KV cache and so of the bytes communicated

    def model_config(self, strategy: str) -> ModelConfig:
        return ModelConfig.from_preset(self.preset, arch=STRATEGY_ARCH[strategy], **self.model_overrides)

    def dims(self, strategy: str) -> ParallelDims:
        return ParallelDims(strategy, self.nproc, self.ranks_per_group if strategy == "gp" else 1,
                            self.ranks_per_node)

    def validate(self) -> None:
        """Fail before any process starts when a strategy cannot run on this launch."""
        for s in self.strategies:
            if s not in STRATEGY_ARCH:
                raise ValueError(f"unknown strategy {s!r}; choose from {sorted(STRATEGY_ARCH)}")
            self.dims(s).validate(self.model_config(s))
        dtype_named(self.dtype)  # raises for an unknown dtype
        for m in self.modes:
            if m not in ("prefill", "decode"):
                raise ValueError(f"unknown mode {m!r}; choose prefill and/or decode")
        if min(self.batch_sizes) < 1 or self.repeats < 1 or self.seq_len < 1:
            raise ValueError("batch sizes, repeats and seq_len must be >= 1")
        cfg = self.model_config(self.strategies[0])
        if "prefill" in self.modes and self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
        if "decode" in self.modes and self.context_len + 1 > cfg.max_seq_len:
            raise ValueError(f"context_len {self.context_len} + 1 exceeds the preset's max_seq_len {cfg.max_seq_len}")


def _shard(B: int, dims: ParallelDims, rank: int) -> int:
    """Sequences of the global batch that this rank's data-parallel shard holds (round robin)."""
    return len(range(dims.dp_rank(rank), B, dims.dp_size))


def _time_one(fn, group=None) -> float:
    """Wall time of fn() on the slowest rank, ranks released together by a barrier."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


@torch.inference_mode()
def bench_worker(rank: int, world: int, bc: ForwardBenchConfig, show_progress: bool = True) -> list[dict]:
    """All strategies' models live side by side in each rank; their timed repeats are interleaved so
    that a change in machine load hits every strategy alike."""
    from foe.model import Transformer
    models, comms, dims = {}, {}, {}
    for s in bc.strategies:
        torch.manual_seed(bc.seed)  # same weights on every rank before slicing
        models[s] = Transformer(bc.model_config(s)).to(dtype_named(bc.dtype)).eval()
        dims[s] = bc.dims(s)
        comms[s] = parallelize(models[s], dims[s], rank)
        comms[s].ledger.enabled = False
    bar = None
    if rank == 0 and show_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(bc.modes) * len(bc.batch_sizes), desc="bench forward", unit="batch size")
    rows: list[dict] = []
    for mode in bc.modes:
        for B in bc.batch_sizes:
            steps = {s: _make_step(models[s], dims[s], rank, mode, B, bc) for s in bc.strategies}
            for _ in range(bc.warmup):
                for s in bc.strategies:
                    _time_one(steps[s])
            times: dict[str, list[float]] = {s: [] for s in bc.strategies}
            for s in bc.strategies:
                comms[s].ledger.clear()
            for _ in range(bc.repeats):
                for s in bc.strategies:
                    comms[s].ledger.enabled = True
                    times[s].append(_time_one(steps[s]))
                    comms[s].ledger.enabled = False
            rows += [_summarise(s, mode, B, times[s], comms[s], models[s].cfg, bc) for s in bc.strategies]
            if bar:
                bar.update()
    if bar:
        bar.close()
    return rows


def _make_step(model, dims: ParallelDims, rank: int, mode: str, B: int, bc: ForwardBenchConfig):
    """A closure running one forward of this rank's shard of the global batch (KV cache filled for decode)."""
    cfg, b = model.cfg, _shard(B, dims, rank)
    g = torch.Generator().manual_seed(bc.seed + B)
    n = bc.seq_len if mode == "prefill" else bc.context_len + 1
    ids = torch.randint(0, cfg.vocab_size, (B, n), generator=g)[dims.dp_rank(rank)::dims.dp_size]
    if mode == "prefill":
        L = bc.seq_len
        return lambda: model(ids, logits_at=torch.arange(b) * L + L - 1)
    cache = model.new_cache(b, bc.context_len + 1)
    model(ids[:, :-1], cache=cache, logits_at=torch.arange(b) * bc.context_len)  # untimed, unaccounted
    pos = torch.full((b, 1), bc.context_len, dtype=torch.long)
    return lambda: model(ids[:, -1:], pos_BL=pos, cache=cache, logits_at=torch.arange(b))


def _summarise(strategy: str, mode: str, B: int, times: list[float], comm, cfg: ModelConfig,
               bc: ForwardBenchConfig) -> dict:
    """Per-rank ledger totals -> global figures (computed identically on every rank via all_gather)."""
    s = comm.ledger.summary()
    mine = torch.tensor([sum(o["bytes_intra"] for o in s["ops"].values()),
                         sum(o["bytes_inter"] for o in s["ops"].values()),
                         sum(o["seconds"] for o in s["ops"].values()),
                         s["expert_rows"]], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_rank = torch.stack(every)
    tokens = B * (bc.seq_len if mode == "prefill" else 1) * bc.repeats
    n, calls = cfg.n_layers, {op: o["calls"] / bc.repeats / cfg.n_layers for op, o in s["ops"].items()}
    rows_pr = per_rank[:, 3]
    times_ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(times_ms, n=10) if len(times_ms) > 1 else [times_ms[0]] * 9
    return {
        "strategy": strategy, "arch": cfg.arch, "mode": mode, "batch": B,
        "tokens_per_forward": tokens // bc.repeats,
        "latency_ms_median": statistics.median(times_ms), "latency_ms_p10": q[0], "latency_ms_p90": q[-1],
        "bytes_per_token_per_layer_intra": float(per_rank[:, 0].sum()) / tokens / n,
        "bytes_per_token_per_layer_inter": float(per_rank[:, 1].sum()) / tokens / n,
        "collective_calls_per_layer": calls,
        "comm_ms_per_forward": float(per_rank[:, 2].max()) / bc.repeats * 1e3,
        "expert_rows_per_rank": [int(r) // bc.repeats for r in rows_pr.tolist()],
        "load_imbalance_max_over_mean": float(rows_pr.max() / rows_pr.mean()) if float(rows_pr.sum()) else 1.0,
    }


def run_forward_bench(bc: ForwardBenchConfig, show_progress: bool = True) -> dict | None:
    """Spawn bc.nproc local ranks, or, under torchrun, run as this rank. Returns the result on rank 0
    (None on the other torchrun ranks)."""
    bc.validate()
    t0 = time.time()
    if "RANK" in os.environ:
        rank, world = init_distributed("gloo")  # this benchmark runs the models on the CPU
        if world != bc.nproc:
            raise ValueError(f"torchrun started {world} ranks but --nproc is {bc.nproc}")
        rows = bench_worker(rank, world, bc, show_progress)
        dist.barrier()
        dist.destroy_process_group()  # a rank leaving with the group alive makes gloo abort its peers
        if rank != 0:
            return None
    else:
        rows = run_ranks(bench_worker, bc.nproc, bc, show_progress, timeout_s=3600)[0]
    cfg = bc.model_config("gp")
    return {"config": {**asdict(bc), "model": cfg.to_dict()},
            "machine": {"torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_rank": max(1, (os.cpu_count() or 1) // bc.nproc)},
            "layout": {s: bc.dims(s).describe() for s in bc.strategies},
            "wall_seconds": time.time() - t0, "results": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """MoE strategy latency / FoE gp latency at each (mode, batch): > 1 means FoE is faster."""
    gp = {(r["mode"], r["batch"]): r for r in rows if r["strategy"] == "gp"}
    out = []
    for r in rows:
        f = gp.get((r["mode"], r["batch"]))
        if r["arch"] == "moe" and f:
            out.append({"mode": r["mode"], "batch": r["batch"], "moe_strategy": r["strategy"],
                        "latency_ratio": r["latency_ms_median"] / f["latency_ms_median"],
                        "bytes_ratio": ((r["bytes_per_token_per_layer_intra"] + r["bytes_per_token_per_layer_inter"])
                                        / max(f["bytes_per_token_per_layer_intra"] + f["bytes_per_token_per_layer_inter"], 1e-9))})
    return out
