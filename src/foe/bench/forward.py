"""`foe bench forward`: the paper's forward-pass latency experiment on this machine.

Synthetic forward passes at a sweep of batch sizes, for MoE `ep`, MoE `tp` and FoE `gp` side by side in
one run on the same ranks, with the same model size and the same global batch. Per (strategy, mode,
batch) it reports latency (median, p10, p90 of the slowest rank), bytes per token per layer (intra/inter
node), collective calls per layer, time spent in collectives and expert load balance (max/mean rows per
rank). Prefill times a forward over `seq_len` new tokens per sequence; decode times one new token per
sequence over a KV cache holding `context_len` tokens. Timing is wall clock (synchronised on CUDA): on a
shared CPU with gloo, bytes and calls are the portable figures and the time is reported beside them.

The ranks come from foe's launcher: local processes, several nodes (each node runs the same command; the
node boundary of the intra/inter byte counts is then the real one), or torchrun's.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from foe.config import ModelConfig
from foe.device import synchronize
from foe.model.precision import dtype_named
from foe.parallel import ParallelDims, parallelize, run_ranks
from foe.parallel.launch import job_hosts, rank_device, ranks_per_host
from foe.parallel.rendezvous import Rendezvous, threads_per_rank

STRATEGY_ARCH = {"ep": "moe", "tp": "moe", "gp": "foe"}


@dataclass(frozen=True)
class ForwardBenchConfig:
    preset: str = "small"
    nproc: int = 2  # ranks in all (over every node)
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
    nnodes: int = 1  # real hosts the ranks run on (ranks_per_node is then nproc / nnodes)
    device: str = "cpu"

    def model_config(self, strategy: str) -> ModelConfig:
        return ModelConfig.from_preset(self.preset, arch=STRATEGY_ARCH[strategy], **self.model_overrides)

    def dims(self, strategy: str) -> ParallelDims:
        return ParallelDims(strategy, self.nproc, self.ranks_per_group if strategy == "gp" else 1,
                            self.ranks_per_node or (self.nproc // self.nnodes if self.nnodes > 1 else None))

    def validate(self) -> None:
        """Fail before any process starts when a strategy cannot run on this launch."""
        if self.nnodes > 1 and (self.nproc % self.nnodes
                                or self.ranks_per_node not in (None, self.nproc // self.nnodes)):
            raise ValueError(f"{self.nproc} ranks on {self.nnodes} nodes: the node boundary is the real one, so "
                             f"ranks_per_node must be nproc / nnodes, got {self.ranks_per_node}")
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


def _time_one(fn) -> float:
    """Wall time of fn() on the slowest rank, ranks released together by a barrier (and, on CUDA, with the
    queued kernels finished before and after: the time is the work's, not its launch's)."""
    device = rank_device()
    synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def check_hosts(bc: ForwardBenchConfig) -> list[str]:
    """Every rank's real host; on several hosts the node layout of the byte accounting must be theirs."""
    hosts = job_hosts()
    real = ranks_per_host(hosts)
    if real is not None and real != bc.dims(bc.strategies[0]).ranks_per_node:
        raise ValueError(f"the ranks run on {len(hosts) // real} hosts of {real}, but the accounting assumes "
                         f"{bc.dims(bc.strategies[0]).ranks_per_node} per node: pass --nnodes {len(hosts) // real}")
    return hosts


@torch.inference_mode()
def bench_worker(rank: int, world: int, bc: ForwardBenchConfig, show_progress: bool = True
                 ) -> tuple[list[dict], list[str]]:
    """All strategies' models live side by side in each rank; their timed repeats are interleaved so
    that a change in machine load hits every strategy alike. Returns the rows and every rank's host."""
    from foe.model import Transformer
    hosts = check_hosts(bc)
    models, comms, dims = {}, {}, {}
    for s in bc.strategies:
        torch.manual_seed(bc.seed)  # same weights on every rank before slicing
        models[s] = Transformer(bc.model_config(s)).to(rank_device(), dtype_named(bc.dtype)).eval()
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
    return rows, hosts


def _make_step(model, dims: ParallelDims, rank: int, mode: str, B: int, bc: ForwardBenchConfig):
    """A closure running one forward of this rank's shard of the global batch (KV cache filled for decode)."""
    cfg, b, dev = model.cfg, _shard(B, dims, rank), rank_device()
    g = torch.Generator().manual_seed(bc.seed + B)
    n = bc.seq_len if mode == "prefill" else bc.context_len + 1
    ids = torch.randint(0, cfg.vocab_size, (B, n), generator=g)[dims.dp_rank(rank)::dims.dp_size].to(dev)
    if mode == "prefill":
        last = torch.arange(b, device=dev) * bc.seq_len + bc.seq_len - 1
        return lambda: model(ids, logits_at=last)
    cache = model.new_cache(b, bc.context_len + 1)
    model(ids[:, :-1], cache=cache, logits_at=torch.arange(b, device=dev) * bc.context_len)  # untimed, unaccounted
    pos = torch.full((b, 1), bc.context_len, dtype=torch.long, device=dev)
    every = torch.arange(b, device=dev)
    return lambda: model(ids[:, -1:], pos_BL=pos, cache=cache, logits_at=every)


def _summarise(strategy: str, mode: str, B: int, times: list[float], comm, cfg: ModelConfig,
               bc: ForwardBenchConfig) -> dict:
    """Per-rank ledger totals -> global figures (computed identically on every rank via all_gather)."""
    s = comm.ledger.summary()
    mine = torch.tensor([sum(o["bytes_intra"] for o in s["ops"].values()),
                         sum(o["bytes_inter"] for o in s["ops"].values()),
                         sum(o["seconds"] for o in s["ops"].values()),
                         s["expert_rows"]], dtype=torch.float64, device=rank_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_rank = torch.stack(every).cpu()
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


def run_forward_bench(bc: ForwardBenchConfig, rdzv: Rendezvous | None = None, show_progress: bool = True
                      ) -> dict | None:
    """Run every rank of `rdzv` (default: bc.nproc local ranks) that lives on this node; the result on the node
    of rank 0 (and under torchrun in rank 0's process), None elsewhere."""
    rdzv = rdzv or Rendezvous(nproc=bc.nproc, device=bc.device)
    if rdzv.world_size != bc.nproc or rdzv.nnodes != bc.nnodes:
        raise ValueError(f"the job has {rdzv.nnodes} node(s) x {rdzv.nproc} ranks, but the benchmark was set up "
                         f"for {bc.nproc} ranks on {bc.nnodes} node(s)")
    bc.validate()
    t0 = time.time()
    every = run_ranks(bench_worker, replace(rdzv, device=bc.device), bc, show_progress, timeout_s=3600)
    if every is None:  # not rank 0's node (or process, under torchrun)
        return None
    cfg, (rows, hosts) = bc.model_config("gp"), every[0]
    return {"config": {**asdict(bc), "model": cfg.to_dict()},
            "machine": {"torch": torch.__version__, "cpus": os.cpu_count(), "device": bc.device,
                        "threads_per_rank": threads_per_rank(rdzv.nproc), "hosts": hosts},
            "layout": {s: bc.dims(s).describe(bc.model_config(s)) for s in bc.strategies},
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
