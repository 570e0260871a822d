"""`foe bench compare`: the paper's serving experiment (FOE.md section 5, item 2) in one command.

Starts `foe serve` for MoE (a chosen strategy, default `ep`) and for FoE (`gp`) on the same number
of ranks, the same preset size and seed, warms both up, and sends both the same LongBench-like
workload with Poisson arrivals at each of the paper's mean inter-arrival times (0.5, 0.75, 1.5 s)
times `time_scale` (see docs/serving-benchmark.md). Server-side timings from /metrics are recorded
beside the client's. Results: the paper's table (MoE time / FoE time at mean, p50, p99 for TTFT,
TBT, E2E), a JSON file and a PNG of latency CDFs. The servers are stopped however the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from foe.bench.datasets import (DEFAULT_LONGBENCH_OUTPUT_SCALE, DEFAULT_LONGBENCH_SCALE, SampleRequest,
                                get_tokenizer, longbench_dataset)
from foe.bench.load_gen import RequestOutput, completion_payload, stream_completion
from foe.bench.report import format_compare_table, plot_cdfs, ratios
from foe.bench.serving import ServeBenchConfig, run_benchmark, write_json
from foe.bench.serving_server import ServerProcess, histogram_delta, scrape

PAPER_SCALES_S = (0.5, 0.75, 1.5)
SERVER_HISTOGRAMS = {"ttft": "foe_time_to_first_token_seconds", "itl": "foe_inter_token_latency_seconds",
                     "e2el": "foe_e2e_request_latency_seconds"}


@dataclass(frozen=True)
class CompareConfig:
    out_dir: str = "runs/serving-compare"
    preset: str = "small"
    checkpoint_moe: str | None = None
    checkpoint_foe: str | None = None
    moe_strategy: str = "ep"
    nproc: int = 2
    paper_scales_s: tuple[float, ...] = PAPER_SCALES_S
    time_scale: float = 1.0  # our arrival scale = paper scale x time_scale
    num_prompts: int = 64  # per arrival scale
    longbench_scale: float = DEFAULT_LONGBENCH_SCALE
    longbench_output_scale: float = DEFAULT_LONGBENCH_OUTPUT_SCALE
    prompt_format: str = "text"
    burstiness: float = 1.0
    seed: int = 0
    warmup: int = 2
    serve_args: tuple[str, ...] = field(default_factory=tuple)  # passed through to `foe serve`
    device: str = "auto"  # foe serve's --device and --dtype, the same for both
    dtype: str = "auto"
    cluster: str | None = None  # an emulated cluster (`foe cluster`): each server is a job on all its ranks
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if not self.paper_scales_s or any(not s > 0 for s in self.paper_scales_s):
            raise ValueError(f"arrival scales must be positive, got {self.paper_scales_s}")
        if not self.time_scale > 0:
            raise ValueError(f"--time-scale must be > 0, got {self.time_scale}")
        if self.num_prompts < 1 or self.warmup < 0:
            raise ValueError("--num-prompts must be >= 1 and --warmup >= 0")
        if self.moe_strategy == "gp":
            raise ValueError("gp is FoE's strategy; choose ep or tp for the MoE baseline")
        if self.prompt_format not in ("text", "ids"):
            raise ValueError(f"prompt format must be text or ids, got {self.prompt_format!r}")

    def serve_args_for(self, arch: str) -> list[str]:
        ckpt = self.checkpoint_moe if arch == "moe" else self.checkpoint_foe
        model = ["--checkpoint", ckpt] if ckpt else ["--preset", self.preset, "--arch", arch, "--seed", str(self.seed)]
        # One rank is the plain single-process model for both (the strategies differ only across ranks).
        strategy = "none" if self.nproc == 1 else self.moe_strategy if arch == "moe" else "gp"
        # on a cluster its job's environment gives the layout (nproc = the cluster's ranks)
        ranks = [] if self.cluster else ["--nproc", str(self.nproc)]
        return [*model, "--strategy", strategy, *ranks, "--device", self.device, "--dtype", self.dtype,
                *self.serve_args]

    def launcher(self, arch: str) -> list[str] | None:
        """How a server is started: by `foe serve` itself, or as a job on every rank of the cluster."""
        if self.cluster is None:
            return None
        logs = str(Path(self.out_dir) / f"server-{arch}-ranks")
        return [sys.executable, "-m", "foe.cli.main", "cluster", "job", "--name", self.cluster, "--logs", logs, "--"]


def server_side_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean TTFT / ITL / E2E (ms) the server observed between two /metrics scrapes."""
    out: dict[str, float] = {}
    for m, name in SERVER_HISTOGRAMS.items():
        total, n = histogram_delta(before, after, name)
        out[f"server_mean_{m}_ms"] = 1000 * total / n if n else float("nan")
        out[f"server_{m}_count"] = n
    return out


def _warm_up(url: str, model: str, reqs: list[SampleRequest]) -> None:
    async def go() -> list[RequestOutput]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
            return [await stream_completion(client, url + "/v1/completions", completion_payload(model, r, True),
                                            RequestOutput(r.prompt_len, r.expected_output_len)) for r in reqs]
    failed = [o.error for o in asyncio.run(go()) if not o.success]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


def _start(cfg: CompareConfig, arch: str, workload: list[SampleRequest], say: Callable[[str], None],
           stack: contextlib.ExitStack) -> tuple[str, str]:
    """Start, warm up and register for clean-up one server; returns (url, model id)."""
    say(f"[{arch.upper()}] starting foe serve {' '.join(cfg.serve_args_for(arch))}")
    t0 = time.perf_counter()
    srv = stack.enter_context(ServerProcess(cfg.serve_args_for(arch), Path(cfg.out_dir) / f"server-{arch}.log",
                                            ready_timeout_s=cfg.ready_timeout_s, launcher=cfg.launcher(arch)))
    model = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    _warm_up(srv.url, model, workload[: cfg.warmup])
    say(f"[{arch.upper()}] ready and warm after {time.perf_counter() - t0:.1f} s on {srv.url}")
    return srv.url, model


def measure(cfg: CompareConfig, arch: str, url: str, model: str, scale: float, workload: list[SampleRequest],
            progress: bool) -> dict[str, Any]:
    """One run of the workload against one server at one arrival scale, with the server's own timings."""
    ours = scale * cfg.time_scale
    bench = ServeBenchConfig(base_url=url, model=model, request_rate=1.0 / ours, burstiness=cfg.burstiness,
                             seed=cfg.seed, ignore_eos=True)
    before = scrape(url)
    res = run_benchmark(bench, workload, progress=progress, desc=f"{arch.upper()} scale {ours:g}s")
    res.update(server_side_means(before, scrape(url)), arch=arch, scale_s=ours, paper_scale_s=scale,
               serve_args=cfg.serve_args_for(arch))
    return res


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """The whole experiment: returns (and writes) {config, rows: [{scale, moe, foe, ratios}]}.

    Both servers stay up (an idle one uses no CPU) and each scale runs MoE and FoE back to back,
    alternating which goes first, so that slow drifts in the machine's load hit both alike."""
    say: Callable[[str], None] = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    tok = get_tokenizer(cfg.checkpoint_foe)
    workload = longbench_dataset(cfg.num_prompts, tok, cfg.prompt_format, cfg.seed,  # type: ignore[arg-type]
                                 cfg.longbench_scale, cfg.longbench_output_scale)
    t0 = time.perf_counter()
    rows = []
    with contextlib.ExitStack() as stack:
        servers = {arch: _start(cfg, arch, workload, say, stack) for arch in ("moe", "foe")}
        for i, scale in enumerate(cfg.paper_scales_s):
            row: dict[str, Any] = {"scale_s": scale * cfg.time_scale, "paper_scale_s": scale}
            for arch in ("moe", "foe") if i % 2 == 0 else ("foe", "moe"):
                row[arch] = res = measure(cfg, arch, *servers[arch], scale, workload, progress)
                say(f"[{arch.upper()}] scale {res['scale_s']:g} s: {res['completed']} ok, {res['failed']} failed, "
                    f"mean TTFT {res['mean_ttft_ms']:.0f} ms, mean TBT {res['mean_itl_ms']:.1f} ms, "
                    f"mean E2E {res['mean_e2el_ms']:.0f} ms")
            row["ratios"] = ratios(row["moe"], row["foe"])
            rows.append(row)
    result = {"config": asdict(cfg), "wall_s": time.perf_counter() - t0, "rows": rows}
    out = Path(cfg.out_dir)
    write_json(result, out / "compare.json")
    plot_cdfs(rows, out / "latency_cdfs.png",
              title=f"{cfg.preset}: MoE ({cfg.moe_strategy}) vs FoE (gp), {cfg.nproc} rank(s), "
                    f"{cfg.num_prompts} requests/scale")
    return result


__all__ = ["CompareConfig", "run_compare", "format_compare_table", "measure", "server_side_means"]
