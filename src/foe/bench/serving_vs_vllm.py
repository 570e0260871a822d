"""`foe bench vs-vllm`: `foe serve` against vLLM (with foe's plugin) on one checkpoint, the same load (issue 15).

One server at a time. Each repeat runs both engines, the order alternating (vLLM, foe | foe, vLLM | ...)
so that slow drifts of a shared machine hit both alike; consecutive runs of the same engine share one
server start. After a start, a few unmeasured requests (prompts of their own) warm the server up; then
every scenario runs: all requests at once (saturation), Poisson arrivals at a fixed rate, and one
request at a time. The load generator, metrics and JSON writer are `foe bench serve`'s.

Settings kept alike: dtype, max sequences per step, tokens per step (the chunked-prefill budget), about
1 GiB of KV cache each, no prefix caching (foe's default; vLLM's is on, which would favour it on
repeated prompts), greedy sampling with ignore_eos so both generate exactly the requested tokens.
Threads: both servers choose their own, with the caller's OMP_NUM_THREADS removed. vLLM's CPU worker
binds its compute threads (`auto`: all cores but one, which is left to its API process; on 2 cores,
core 0 computes); `foe serve`'s engine core also computes on the cores less one (unpinned), its API
process keeping the rest. `foe_threads` sets foe's OMP_NUM_THREADS instead.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from foe.bench.datasets import SampleRequest, get_tokenizer, random_dataset
from foe.bench.serving import ServeBenchConfig, run_benchmark, write_json
from foe.bench.serving_server import ServerProcess
from foe.bench.serving_vllm import bench_checkpoint, probe_vllm, say_stderr, start_warm, vllm_server, with_env
from foe.bench.vs_vllm_config import SCENARIOS, VsVllmConfig, run_order
from foe.bench.vs_vllm_report import format_ratio_table, plot_ratios, ratio_rows

def make_server(cfg: VsVllmConfig, engine: str, ckpt: Path, vllm_python: str, log: Path) -> ServerProcess:
    if engine == "vllm":
        return vllm_server(vllm_python, ckpt, log, dtype=cfg.dtype, max_num_seqs=cfg.max_num_seqs,
                           max_num_batched_tokens=cfg.max_num_batched_tokens, kv_cache_gib=cfg.kv_cache_gib,
                           extra_args=("--no-enable-prefix-caching", *cfg.vllm_args),
                           ready_timeout_s=cfg.ready_timeout_s)
    args = ["--checkpoint", str(ckpt), "--dtype", cfg.dtype, "--max-num-seqs", str(cfg.max_num_seqs),
            "--max-num-batched-tokens", str(cfg.max_num_batched_tokens), *cfg.serve_args]
    srv = ServerProcess(args, log, ready_timeout_s=cfg.ready_timeout_s)
    if cfg.foe_threads is None:  # foe serve's own choice, not whatever the caller's shell set
        return with_env(srv, {}, unset=("OMP_NUM_THREADS",))
    return with_env(srv, {"OMP_NUM_THREADS": str(cfg.foe_threads)})


def workloads(cfg: VsVllmConfig, ckpt: Path) -> tuple[dict[str, list[SampleRequest]], list[SampleRequest]]:
    """One random workload per scenario (its own seed) and warm-up prompts unlike any of them."""
    tok = get_tokenizer(str(ckpt))
    make = lambda n, seed: random_dataset(n, cfg.input_len, cfg.output_len, 0.0, tok, "text", seed)  # noqa: E731
    loads = {s: make(cfg.scenario(s)["n"], cfg.seed + 1 + i) for i, s in enumerate(cfg.scenarios)}
    return loads, make(max(cfg.warmup, 1), cfg.seed + 1000)[: cfg.warmup]


def run_vs_vllm(cfg: VsVllmConfig, progress: bool = True, say: Callable[[str], None] = say_stderr) -> dict[str, Any]:
    """The whole comparison; returns (and writes to out_dir/vs_vllm.json) {config, versions, runs, rows}.

    progress: per-request bars; `say` gets one line per server start and per run either way."""
    vllm_python = cfg.vllm_python or sys.executable
    version = probe_vllm(cfg.vllm_python)
    say(f"vLLM {version} in {vllm_python}")
    ckpt = bench_checkpoint(cfg.checkpoint, cfg.out_dir, cfg.preset, cfg.arch, cfg.seed, say)
    loads, warm = workloads(cfg, ckpt)
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        srv: ServerProcess | None = None
        current = None
        for repeat, engine in run_order(cfg.repeats):
            if engine != current:
                if srv is not None:
                    srv.stop()  # one server at a time
                srv = make_server(cfg, engine, ckpt, vllm_python, out / f"server-{engine}-r{repeat + 1}.log")
                stack.callback(srv.stop)
                model = start_warm(srv, warm, f"{engine}, repeat {repeat + 1}/{cfg.repeats}", say)
                current = engine
            assert srv is not None
            for name in cfg.scenarios:
                sc = cfg.scenario(name)
                bench = ServeBenchConfig(base_url=srv.url, model=model, request_rate=sc["request_rate"],
                                         max_concurrency=sc["max_concurrency"], seed=cfg.seed, ignore_eos=True)
                res = run_benchmark(bench, loads[name], progress=progress, desc=f"{engine} {name} r{repeat + 1}")
                res.update(engine=engine, repeat=repeat, scenario=name)
                runs.append(res)
                say(f"[{engine}] repeat {repeat + 1} {name}: {res['completed']} ok, {res['failed']} failed, "
                    f"{res['output_throughput']:.0f} tok/s, median TTFT {res['median_ttft_ms']:.0f} ms, "
                    f"TPOT {res['median_tpot_ms']:.1f} ms, E2E {res['median_e2el_ms']:.0f} ms")
    rows = ratio_rows(runs, cfg.scenarios)
    result = {"config": {**asdict(cfg), "checkpoint": str(ckpt), "vllm_python": vllm_python},
              "versions": {"vllm": version}, "wall_s": time.perf_counter() - t0, "rows": rows, "runs": runs}
    write_json(result, out / "vs_vllm.json")
    plot_ratios(rows, out / "vs_vllm.png", title=f"foe serve / vLLM {version}: {ckpt.name}, {cfg.dtype}, "
                                                 f"{cfg.input_len} in / {cfg.output_len} out, {cfg.repeats} repeats")
    return result


__all__ = ["VsVllmConfig", "run_vs_vllm", "run_order", "format_ratio_table", "SCENARIOS"]
