"""One engine step, taken apart: where the time of a decode step and of a mixed step goes.

Three measurements in one run, on one model with random weights:
- engine: `LLMEngine.step()` with `batch` sequences decoding at `context` tokens each (greedy, or
  sampled at temperature 1), split into schedule, model (the runner: packing + forward) and the rest
  (sampling, stop checks, outputs);
- runner: the same decode batch, and a mixed batch (the decodes plus one fresh prompt chunk of `chunk`
  tokens), through the paged pool with the native decode kernel (CPU only) and with the torch path
  (gather + SDPA), beside the same decode forward over a dense contiguous cache (`DenseKVCache`, no
  paging). Paging overhead = paged step / dense step - 1;
- profile: torch.profiler's top operators of a decode and a mixed step (the runner's default path;
  on CUDA by the GPU's time).

Variants are interleaved, best-of-`repeats` counts (a shared machine slows some calls, never speeds
any up). `clock="cpu"` with one thread times the thread's CPU time instead of elapsed time. On
`device="cuda"` every clock reading first waits for the GPU (`foe.device.synced_clock`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from foe.config import ModelConfig
from foe.bench.model_latency import CLOCKS
from foe.device import resolve_device, synced_clock
from foe.engine import kernels
from foe.engine.engine import LLMEngine
from foe.engine.request import RequestParams, RowPlan
from foe.engine.runner import ModelRunner
from foe.engine.sampler import SamplingParams
from foe.engine.scheduler import SchedulerConfig
from foe.model.transformer import Transformer



@dataclass(frozen=True)
class StepBenchConfig:
    preset: str = "small"
    arch: str = "moe"
    batch: int = 64  # sequences decoding
    context: int = 256  # tokens each decoding sequence already holds
    chunk: int = 256  # the mixed step's prompt chunk
    block_size: int = 16
    temperature: float = 0.0  # of the engine step's requests (0: greedy)
    repeats: int = 20
    dtype: str = "float32"
    threads: int | None = 1
    clock: str = "wall"
    seed: int = 0
    profile_rows: int = 12
    device: str = "cpu"  # cpu or cuda (foe.device)

    def __post_init__(self) -> None:
        for name in ("batch", "context", "chunk", "block_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {self.clock!r}")
        if self.clock == "cpu" and self.threads != 1:
            raise ValueError("clock 'cpu' measures one thread's CPU time: it needs threads=1")
        if self.torch_device.type == "cuda" and self.clock == "cpu":  # resolving raises for cuda without a GPU
            raise ValueError("clock 'cpu' counts this thread's CPU time, not the GPU's work: use the wall clock "
                             "on cuda")

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)  # ValueError for cuda without a GPU


def _best(calls: dict[str, Callable[[], Any]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Best time (ms) of each call, interleaved round by round after one warm-up round. The order is
    shuffled every round: a call that always followed a big one would always find the caches cold."""
    for f in calls.values():
        f()
    best = {name: float("inf") for name in calls}
    order = list(calls.items())
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name, f in order:
            t0 = clock()
            f()
            best[name] = min(best[name], clock() - t0)
    return {name: 1e3 * t for name, t in best.items()}


def step_rows(cfg: StepBenchConfig, vocab: int) -> tuple[list[RowPlan], list[RowPlan], int]:
    """(decode rows, mixed rows, pool blocks they use): `batch` decode rows at position `context` on
    shuffled (scattered) blocks; mixed = those plus one fresh `chunk`-token prompt on the next blocks."""
    rng = random.Random(cfg.seed)
    per = -(-(cfg.context + 1) // cfg.block_size)
    blocks = list(range(cfg.batch * per))
    rng.shuffle(blocks)
    decode = [RowPlan(i, [rng.randrange(vocab)], cfg.context, blocks[i * per:(i + 1) * per], 0)
              for i in range(cfg.batch)]
    used = cfg.batch * per
    chunk_blocks = list(range(used, used + -(-cfg.chunk // cfg.block_size)))
    chunk = RowPlan(cfg.batch, [rng.randrange(vocab) for _ in range(cfg.chunk)], 0, chunk_blocks, cfg.chunk - 1)
    return decode, decode + [chunk], used + len(chunk_blocks)


def time_runner(model: Transformer, cfg: StepBenchConfig, clock: Callable[[], float]) -> dict[str, float]:
    """Best ms of each runner variant; the kernel's only where it runs (on the CPU, once built)."""
    decode, mixed, num_blocks = step_rows(cfg, model.cfg.vocab_size)
    device = model.embed.weight.device
    paths = ("kernel", "torch") if kernels.decode_kernel_available(device) else ("torch",)
    runners = {path: ModelRunner(model, num_blocks, cfg.block_size, paged_kernel=path == "kernel") for path in paths}
    for r in runners.values():  # random context in the pool, as the prefill would have left it
        r.pool.k.normal_()
        r.pool.v.normal_()
    dense = model.new_cache(cfg.batch, cfg.context + 1)
    dense.k.normal_()
    dense.v.normal_()
    ids = torch.tensor([[r.token_ids[0]] for r in decode], device=device)
    pos = torch.full((cfg.batch, 1), cfg.context, device=device)
    rows = torch.arange(cfg.batch, device=device)

    @torch.inference_mode()
    def dense_decode() -> None:
        model(ids, pos_BL=pos, cache=dense, logits_at=rows)

    calls: dict[str, Callable[[], Any]] = {"decode dense": dense_decode}
    for path, r in runners.items():
        calls[f"decode {path}"] = lambda r=r: r.execute(decode)
        calls[f"mixed {path}"] = lambda r=r: r.execute(mixed)
    return _best(calls, cfg.repeats, clock)


class _Timed:
    """Wraps one method of an object, adding its time to `total`."""

    def __init__(self, fn: Callable[..., Any], clock: Callable[[], float]) -> None:
        self.fn, self.clock, self.total = fn, clock, 0.0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = self.clock()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += self.clock() - t0


def time_engine_step(model: Transformer, cfg: StepBenchConfig, clock: Callable[[], float]) -> dict[str, float]:
    """Mean time per `LLMEngine.step()` of `batch` decoding sequences, and its parts (ms)."""
    per = -(-(cfg.context + cfg.repeats + 3) // cfg.block_size)
    # Every prompt prefills in the first step, so all `batch` sequences decode together afterwards.
    sched = SchedulerConfig(max_num_seqs=cfg.batch, max_num_batched_tokens=cfg.batch * cfg.context,
                            num_blocks=cfg.batch * per, block_size=cfg.block_size)
    engine = LLMEngine.from_model(model, sched)
    rng = random.Random(cfg.seed)
    params = RequestParams(max_tokens=cfg.repeats + 3, ignore_eos=True,
                           sampling=SamplingParams(temperature=cfg.temperature, seed=cfg.seed))
    for _ in range(cfg.batch):
        engine.add_request([rng.randrange(model.cfg.vocab_size) for _ in range(cfg.context)], params)
    engine.step()  # the prefill
    engine.step()  # a warm-up decode
    schedule = engine.scheduler.schedule = _Timed(engine.scheduler.schedule, clock)
    execute = engine.executor.execute = _Timed(engine.executor.execute, clock)
    steps, t0 = cfg.repeats, clock()
    for _ in range(steps):
        engine.step()
    total = clock() - t0
    if len(engine.seqs) != cfg.batch:
        raise RuntimeError(f"expected {cfg.batch} sequences decoding, found {len(engine.seqs)}")
    ms = {"step": total, "schedule": schedule.total, "model": execute.total}
    ms["sample + outputs"] = total - schedule.total - execute.total
    return {k: 1e3 * v / steps for k, v in ms.items()}


def profile_runner(model: Transformer, cfg: StepBenchConfig) -> dict[str, str]:
    """torch.profiler tables of a decode and a mixed step: top operators by self CPU time, or on CUDA by
    self GPU time (the CPU time of a GPU step is mostly launching kernels)."""
    decode, mixed, num_blocks = step_rows(cfg, model.cfg.vocab_size)
    runner = ModelRunner(model, num_blocks, cfg.block_size)
    cuda = runner.pool.k.is_cuda
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    tables = {}
    for name, rows in (("decode", decode), ("mixed", mixed)):
        runner.execute(rows)
        with profile(activities=activities) as prof:
            for _ in range(5):
                runner.execute(rows)
        tables[name] = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                                 row_limit=cfg.profile_rows)
    return tables


def run_step_bench(cfg: StepBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig.from_preset(cfg.preset, arch=cfg.arch)
    if cfg.context + cfg.repeats + 3 > mcfg.max_seq_len or cfg.chunk > mcfg.max_seq_len:
        raise ValueError(f"context {cfg.context} (+ {cfg.repeats + 3} decodes) or chunk {cfg.chunk} exceeds the "
                         f"{cfg.preset} preset's {mcfg.max_seq_len} positions")
    model = Transformer(mcfg).to(cfg.torch_device, getattr(torch, cfg.dtype)).eval()
    clock = synced_clock(cfg.torch_device, CLOCKS[cfg.clock])
    log(f"{cfg.arch} {cfg.preset} {cfg.dtype} on {cfg.torch_device.type}: {cfg.batch} sequences at {cfg.context} "
        f"tokens, {torch.get_num_threads()} thread(s), {cfg.clock} clock, best of {cfg.repeats}")
    log("timing the runner (decode and mixed steps; kernel, torch path, dense cache) ...")
    runner = time_runner(model, cfg, clock)
    log("timing engine steps ...")
    engine = time_engine_step(model, cfg, clock)
    log("profiling ...")
    tables = profile_runner(model, cfg)
    overhead = {path: runner[f"decode {path}"] / runner["decode dense"] - 1 for path in ("kernel", "torch")
                if f"decode {path}" in runner}
    return dict(config=asdict(cfg), runner_ms=runner, engine_step_ms=engine, paging_overhead=overhead,
                profiles=tables)


def format_report(res: dict[str, Any]) -> str:
    r, e, o = res["runner_ms"], res["engine_step_ms"], res["paging_overhead"]
    c = res["config"]

    def ms(key: str) -> str:  # "-" where a variant does not exist (no kernel on CUDA; no dense mixed step)
        return f"{r[key]:8.2f}" if key in r else f"{'-':>8}"

    lines = [f"runner, one forward (ms): {c['batch']} decodes at {c['context']} tokens; mixed = + a {c['chunk']}-token prompt",
             f"  {'':8} {'kernel':>8} {'torch':>8} {'dense':>8}",
             f"  {'decode':8} {ms('decode kernel')} {ms('decode torch')} {ms('decode dense')}",
             f"  {'mixed':8} {ms('mixed kernel')} {ms('mixed torch')} {ms('mixed dense')}",
             "paging overhead vs the dense cache (decode): "
             + ", ".join(f"{'torch path' if p == 'torch' else p} {v:+.1%}" for p, v in o.items()),
             f"engine step, {c['batch']} decoding ({'greedy' if not c['temperature'] else 'temperature ' + str(c['temperature'])}), "
             f"ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in e.items())]
    for name, table in res["profiles"].items():
        lines += [f"\nprofile of a {name} step (5 calls, the runner's default path):", table]
    return "\n".join(lines)
