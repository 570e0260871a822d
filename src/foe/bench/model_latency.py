"""`foe bench model`: single-process forward latency of MoE and FoE at one preset size, side by side,
against a naive per-expert loop and against this machine's floor.

For every (phase, batch B, sequence length L) it times, in one run and interleaved round-robin so
that background load hits all variants alike:
  moe    the MoE transformer, fast path (grouped expert matmuls)
  foe    the FoE transformer of the same preset, fast path
  naive  the MoE transformer with every feed-forward swapped for the Hugging Face Mixtral-style loop
         of `model_naive.py` (same weights, same function)
It also times one feed-forward layer alone (layer 0 of each model, and the naive loop over the MoE
layer's weights) at every token count the sweep uses: the part of the layer the fast path replaces,
without the attention and norms that all three variants share.
Phases: "prefill" = B sequences of L new tokens written into an empty KV cache, logits for the last
token of each (what generation does first); "decode" = one new token per sequence after L cached
tokens, logits for it. Each variant gets `warmup` untimed calls, then `repeats` timed ones; we report
the median and p10/p90. The floor (`model_floor.py`) uses the machine's matmul rate and copy
bandwidth, measured in the same run before and after the sweep (the faster of the two, so the floor
is never flattered by a slow moment). Prefill shapes over `max_prefill_tokens` are skipped. On a
shared machine, `clock="cpu"` with one thread times this thread's CPU time instead of elapsed time,
for the model and the machine rates alike. `clock="auto"` (the default) picks "wall" with torch's
threads on a quiet machine and "cpu" with one thread when the load average is already near the core
count (several torch threads then mostly wait for each other); the JSON records the choice and the
load average before and after. On `device="cuda"` the models, inputs, KV caches and the floor's matmul and
copy run on the GPU, every reading of the (wall) clock waits for the GPU first (`foe.device.synced_clock`),
and the floor is the GPU's measured rates.

It does not measure distributed execution (`foe bench forward` does) or serving (`foe bench serve`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass, field, replace

import torch

from foe.bench.model_floor import ForwardWork, MachineRates, ffn_work, forward_work, measure_machine
from foe.bench.model_naive import NaiveSparseMoE, naive_feed_forwards
from foe.config import ModelConfig
from foe.device import resolve_device, synced_clock
from foe.model import DenseKVCache, ModelOutput, Transformer
from foe.model.precision import dtype_named

PHASES = ("prefill", "decode")
# "cpu" is for a shared machine: with one thread, the thread's CPU time leaves out the time other
# processes held the core (though not their pressure on caches and memory bandwidth).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class ModelBenchConfig:
    preset: str = "small"
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    seq_lens: tuple[int, ...] = (128, 512)
    phases: tuple[str, ...] = PHASES
    repeats: int = 7
    warmup: int = 1
    naive: bool = True
    feed_forward: bool = True  # also time one feed-forward layer alone at each token count
    seed: int = 0
    threads: int | None = None  # None: torch's default
    max_prefill_tokens: int = 8192  # prefill shapes with B * L above this are skipped (they take long)
    clock: str = "auto"  # wall: elapsed time; cpu: this thread's CPU time (needs threads=1); auto: see below
    dtype: str = "float32"  # of weights, activations and KV cache, and of the floor's matmul (foe.model.precision)
    device: str = "cpu"  # cpu or cuda (foe.device): where models, inputs and the floor's measurements run

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"sequence lengths must be positive integers, got {self.seq_lens}")
        if not self.phases or any(p not in PHASES for p in self.phases):
            raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {self.phases}")
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError(f"need repeats >= 1 and warmup >= 1, got {self.repeats} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.clock not in (*CLOCKS, "auto"):
            raise ValueError(f"clock must be one of {(*CLOCKS, 'auto')}, got {self.clock!r}")
        if self.clock == "cpu" and self.threads != 1:
            raise ValueError("clock 'cpu' measures one thread's CPU time: it needs threads=1")
        if self.torch_device.type == "cuda" and self.clock == "cpu":  # resolving raises for cuda without a GPU
            raise ValueError("clock 'cpu' counts this thread's CPU time, not the GPU's work: use the wall clock "
                             "on cuda")
        self.torch_dtype  # raises for an unknown dtype
        cfg = ModelConfig.from_preset(self.preset)  # raises for an unknown preset
        if max(self.seq_lens) + 1 > cfg.max_seq_len:
            raise ValueError(f"seq len {max(self.seq_lens)} + 1 decode token exceeds max_seq_len "
                             f"{cfg.max_seq_len} of preset {self.preset!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_named(self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)  # ValueError for cuda without a GPU

    def timer(self) -> Callable[[], float]:
        """The clock of `clock`, synchronising with the device on CUDA."""
        return synced_clock(self.torch_device, CLOCKS[self.clock])


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        ms = sorted(s * 1e3 for s in seconds)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return cls(statistics.median(ms), q[0], q[-1])


def _ratios(timings: dict[str, Timing], floor_ms: dict[str, float], tokens: int) -> dict[str, float]:
    """FoE/MoE, each arch's fraction of its floor, tokens/s, and speedups over the naive loop."""
    t = {k: v.median_ms for k, v in timings.items()}
    d = {"foe_over_moe": t["foe"] / t["moe"]}
    for arch in ("moe", "foe"):
        d[f"{arch}_frac_floor"] = floor_ms[arch] / t[arch]
        d[f"{arch}_tok_per_s"] = tokens / t[arch] * 1e3
        if "naive" in t:
            d[f"{arch}_speedup_vs_naive"] = t["naive"] / t[arch]
    if "naive" in t:  # naive uses the MoE weights: its floor is MoE's
        d["naive_frac_floor"] = floor_ms["moe"] / t["naive"]
    return d


@dataclass
class Row:
    phase: str
    batch: int
    seq_len: int  # prefill: new tokens per sequence; decode: cached context per sequence
    new_tokens: int  # tokens computed this forward (B * L for prefill, B for decode)
    timings: dict[str, Timing]  # variant -> timing
    floor_ms: dict[str, float]  # arch -> floor
    gflops: dict[str, float]  # arch -> work of one forward
    mbytes: dict[str, float]  # arch -> weights + KV bytes touched
    derived: dict[str, float] = field(default_factory=dict)

    def derive(self) -> None:
        self.derived = _ratios(self.timings, self.floor_ms, self.new_tokens)


@dataclass
class FeedForwardRow:
    """One feed-forward layer alone over `tokens` tokens (FoE: every group's stream of them)."""
    tokens: int
    timings: dict[str, Timing]
    floor_ms: dict[str, float]
    derived: dict[str, float] = field(default_factory=dict)

    def derive(self) -> None:
        self.derived = _ratios(self.timings, self.floor_ms, self.tokens)


def build_models(bench: ModelBenchConfig) -> dict[str, Transformer]:
    """MoE and FoE at the same preset size, each from the same seed, in eval mode and the bench's dtype."""
    models = {}
    for arch in ("moe", "foe"):
        torch.manual_seed(bench.seed)
        models[arch] = Transformer(ModelConfig.from_preset(bench.preset, arch=arch)).to(
            bench.torch_device, bench.torch_dtype).eval()
    return models


def _call(model: Transformer, phase: str, ids_BL: torch.Tensor, cache: DenseKVCache) -> ModelOutput:
    B, L = ids_BL.shape
    rows = torch.arange(B, device=ids_BL.device)
    if phase == "prefill":
        return model(ids_BL, cache=cache, logits_at=rows * L + (L - 1))
    return model(ids_BL, pos_BL=torch.full((B, 1), cache.max_len - 1, device=ids_BL.device), cache=cache,
                 logits_at=rows)


def _shape_inputs(model: Transformer, phase: str, B: int, L: int, gen: torch.Generator
                  ) -> tuple[torch.Tensor, DenseKVCache]:
    """Token ids and a KV cache for one shape, on the model's device (`gen`'s). Decode's cache holds L
    random keys/values (the values do not change the cost) and room for the new token, which every timed
    call rewrites in place."""
    V = model.cfg.vocab_size
    if phase == "prefill":
        return torch.randint(0, V, (B, L), generator=gen, device=gen.device), model.new_cache(B, L)
    cache = model.new_cache(B, L + 1)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    return torch.randint(0, V, (B, 1), generator=gen, device=gen.device), cache


def time_shape(models: dict[str, Transformer], phase: str, B: int, L: int, bench: ModelBenchConfig
               ) -> tuple[dict[str, Timing], dict[str, int]]:
    """Interleaved timings of every variant at one shape, and experts hit per arch (from its output)."""
    gen = torch.Generator(bench.torch_device).manual_seed(bench.seed + 7919 * B + L)
    calls: dict[str, Callable[[], ModelOutput]] = {}
    for arch in ("moe", "foe"):
        ids, cache = _shape_inputs(models[arch], phase, B, L, gen)
        calls[arch] = lambda m=models[arch], i=ids, c=cache: _call(m, phase, i, c)
    if bench.naive:
        ids, cache = _shape_inputs(models["moe"], phase, B, L, gen)

        def naive(m: Transformer = models["moe"], i: torch.Tensor = ids, c: DenseKVCache = cache) -> ModelOutput:
            with naive_feed_forwards(m):
                return _call(m, phase, i, c)
        calls["naive"] = naive
    timings, outs = _interleaved(calls, bench)
    return timings, {arch: int((outs[arch].expert_counts > 0).sum()) for arch in models}


def time_feed_forward(models: dict[str, Transformer], tokens: int, bench: ModelBenchConfig
                      ) -> tuple[dict[str, Timing], dict[str, int]]:
    """Interleaved timings of layer 0's feed-forward of each model (and the naive loop over the MoE
    layer's weights) on `tokens` random hidden states per group, and experts hit per arch."""
    gen = torch.Generator(bench.torch_device).manual_seed(bench.seed + 104729 * tokens)
    calls: dict[str, Callable[[], tuple]] = {}
    for arch in ("moe", "foe"):
        cfg = models[arch].cfg
        x = torch.randn(cfg.num_groups, tokens, cfg.d_model, generator=gen, device=gen.device).to(bench.torch_dtype)
        calls[arch] = lambda f=models[arch].layers[0].ffn, x=x: f(x)
    if bench.naive:
        cfg = models["moe"].cfg
        x = torch.randn(1, tokens, cfg.d_model, generator=gen, device=gen.device).to(bench.torch_dtype)
        calls["naive"] = lambda f=NaiveSparseMoE(models["moe"].layers[0].ffn), x=x: f(x)
    timings, outs = _interleaved(calls, bench)
    return timings, {arch: int((outs[arch][1].counts_E > 0).sum()) for arch in models}


def _interleaved(calls: dict[str, Callable[[], Any]], bench: ModelBenchConfig
                 ) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Warm up each call (keeping its first output), then time them round-robin `repeats` times."""
    outs = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            outs[name] = fn()
            for _ in range(bench.warmup - 1):
                fn()
        clock = bench.timer()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(bench.repeats):
            for name, fn in calls.items():
                t0 = clock()
                fn()
                samples[name].append(clock() - t0)
    return {name: Timing.of(s) for name, s in samples.items()}, outs


def run_model_bench(bench: ModelBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the sweep; returns a JSON-able dict (machine, settings, rows, targets)."""
    threads = torch.get_num_threads()
    if bench.clock == "auto":
        # the CPU's load average says nothing about a GPU's work, which only the wall clock sees
        busy = (os.getloadavg()[0] > _cores() - 0.5 and bench.threads in (None, 1)
                and bench.torch_device.type == "cpu")
        bench = replace(bench, clock="cpu" if busy else "wall", threads=1 if busy else bench.threads)
        if busy:
            log(f"machine busy (load average {os.getloadavg()[0]:.1f} on {_cores()} cores): timing one "
                f"thread's CPU time (--clock cpu --threads 1); pass --clock wall to time elapsed time")
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    try:
        return _run(bench, log)
    finally:
        torch.set_num_threads(threads)


def _run(bench: ModelBenchConfig, log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    shapes = [(phase, L, B) for phase in bench.phases for L in bench.seq_lens for B in bench.batch_sizes]
    skipped = [{"phase": p, "batch": B, "seq_len": L} for p, L, B in shapes
               if p == "prefill" and B * L > bench.max_prefill_tokens]
    shapes = [(p, L, B) for p, L, B in shapes if not (p == "prefill" and B * L > bench.max_prefill_tokens)]
    if not shapes:
        raise ValueError(f"nothing to run: every prefill shape has B * L > max_prefill_tokens "
                         f"({bench.max_prefill_tokens})")
    models = build_models(bench)
    log(f"measuring machine rates ({torch.get_num_threads()} threads, {bench.clock} clock) ...")
    load_before = os.getloadavg()
    if bench.clock == "wall" and load_before[0] > _cores() - 0.5:
        # Other processes compete for the cores: elapsed times (worst with several torch threads,
        # which wait for each other) then measure the machine's load more than the model.
        log(f"warning: load average {load_before[0]:.1f} on {_cores()} cores; wall-clock timings will be "
            f"unreliable. On a shared machine use --clock cpu --threads 1.")
    rates_before = measure_machine(clock=bench.timer(), dtype=bench.torch_dtype, device=bench.torch_device)
    rows: list[Row] = []
    works: list[dict[str, ForwardWork]] = []
    for phase, L, B in shapes:
        timings, hit = time_shape(models, phase, B, L, bench)
        new, ctx = (B * L, 0) if phase == "prefill" else (B, L)
        works.append({arch: forward_work(models[arch].cfg, B, new // B, ctx, hit[arch], B,
                                         bench.torch_dtype.itemsize) for arch in ("moe", "foe")})
        rows.append(Row(phase, B, L, new, timings, {},
                        {a: w.flops / 1e9 for a, w in works[-1].items()},
                        {a: (w.weight_bytes + w.kv_bytes) / 1e6 for a, w in works[-1].items()}))
        log(f"  {phase:7s} B={B:<4d} L={L:<5d} " + "  ".join(
            f"{k} {v.median_ms:8.2f} ms" for k, v in timings.items()))
    ffn_rows: list[FeedForwardRow] = []
    ffn_works: list[dict[str, ForwardWork]] = []
    if bench.feed_forward:
        for T in sorted({new for p, L, B in shapes for new in [B * L if p == "prefill" else B]}):
            timings, hit = time_feed_forward(models, T, bench)
            ffn_works.append({arch: ffn_work(models[arch].cfg, T, hit[arch], bench.torch_dtype.itemsize)
                              for arch in ("moe", "foe")})
            ffn_rows.append(FeedForwardRow(T, timings, {}))
            log(f"  ffn     T={T:<5d}        " + "  ".join(
                f"{k} {v.median_ms:8.2f} ms" for k, v in timings.items()))
    rates_after = measure_machine(clock=bench.timer(), dtype=bench.torch_dtype, device=bench.torch_device)
    rates = MachineRates(max(rates_before.matmul_gflops, rates_after.matmul_gflops),
                         max(rates_before.copy_gbps, rates_after.copy_gbps), rates_before.threads,
                         rates_before.matmul_size, rates_before.copy_mib)
    for row, work in [*zip(rows, works), *zip(ffn_rows, ffn_works)]:
        row.floor_ms = {a: w.floor_s(rates) * 1e3 for a, w in work.items()}
        row.derive()
    return {
        "benchmark": "model_latency",
        "settings": asdict(bench),
        "model_config": {a: m.cfg.to_dict() for a, m in models.items()},
        "params": {a: m.num_params() for a, m in models.items()},
        "machine": {"rates": asdict(rates), "rates_before": asdict(rates_before),
                    "rates_after": asdict(rates_after), "cpu": _cpu_name(), "cores": _cores(),
                    "device": _device_name(bench.torch_device),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")},  # foe.malloc
        "rows": [asdict(r) for r in rows],
        "feed_forward_rows": [asdict(r) for r in ffn_rows],
        "skipped": skipped,
        "targets": targets(rows, ffn_rows),
        "wall_s": time.perf_counter() - start,
    }


def targets(rows: list[Row], ffn_rows: list[FeedForwardRow] = ()) -> dict[str, dict]:
    """The issue's two targets: fast path >= 3x the naive loop at batch >= 16; prefill <= 2x the floor.
    Each is reported per arch as the worst case over the rows it applies to (None if none apply), with
    the feed-forward layer alone beside it. "bound" is the physics: at each batch >= 16 row no code can
    beat the naive loop by more than naive time / floor; the smallest such ratio caps the speedup
    target on this machine."""
    out: dict[str, dict] = {}
    for arch in ("moe", "foe"):
        big = [r.derived[f"{arch}_speedup_vs_naive"] for r in rows
               if r.batch >= 16 and f"{arch}_speedup_vs_naive" in r.derived]
        ffn = [r.derived[f"{arch}_speedup_vs_naive"] for r in ffn_rows
               if r.tokens >= 16 and f"{arch}_speedup_vs_naive" in r.derived]
        pre = [1 / r.derived[f"{arch}_frac_floor"] for r in rows if r.phase == "prefill"]
        out[arch] = {
            "min_speedup_vs_naive_batch_ge_16": min(big) if big else None,
            "speedup_target_met": (min(big) >= 3.0) if big else None,
            "ffn_min_speedup_vs_naive_tokens_ge_16": min(ffn) if ffn else None,
            "max_prefill_over_floor": max(pre) if pre else None,
            "floor_target_met": (max(pre) <= 2.0) if pre else None,
        }
    capped = [r for r in rows if r.batch >= 16 and "naive_frac_floor" in r.derived]
    if capped:
        r = min(capped, key=lambda r: 1 / r.derived["naive_frac_floor"])
        out["bound"] = {"phase": r.phase, "batch": r.batch, "seq_len": r.seq_len,
                        "naive_frac_floor": r.derived["naive_frac_floor"],
                        "max_possible_speedup": 1 / r.derived["naive_frac_floor"]}
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
