"""`foe bench compare --engine vllm`: the paper's MoE-vs-FoE serving experiment inside vLLM (issue 14, item 4).

The same workload, arrival scales, table and plots as `foe bench compare` (serving_compare.py), with
vLLM and foe's plugin serving both checkpoints on `nproc` tensor-parallel ranks: the FoE checkpoint as
group parallelism (each rank holds whole groups; one all-reduce per layer plus the final one), the MoE
one as vLLM's own tensor parallelism (heads and every expert split across ranks). vLLM's expert
parallelism (`--enable-expert-parallel`) kills its CPU worker with a segmentation fault at the first
forward (vLLM 0.32.0, docs/vllm.md), so on the CPU the MoE baseline is `tp`, and `ep` is refused.

The servers run one at a time (MoE, then FoE): an idle vLLM keeps its rank processes and their
pinned cores, so two side by side on a small machine would disturb each other. With several ranks on
this host each rank gets a core of its own (VLLM_CPU_OMP_THREADS_BIND "0|1|..."), as docs/vllm.md does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from foe.bench.datasets import get_tokenizer, longbench_dataset
from foe.bench.report import plot_cdfs, ratios
from foe.bench.serving import ServeBenchConfig, run_benchmark, write_json
from foe.bench.serving_compare import CompareConfig
from foe.bench.serving_vllm import bench_checkpoint, probe_vllm, say_stderr, start_warm, vllm_server

EP_SEGFAULT = ("vLLM's expert parallelism crashes its CPU worker (segmentation fault at the first forward, vLLM "
               "0.32.0; docs/vllm.md): use --moe-strategy tp for the MoE baseline inside vLLM")


def rank_binding(nproc: int, cores: int | None = None) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `nproc` ranks: None (vLLM's `auto`) for one, else one core each
    ("0|1"), or the cores shared out in ranges ("0-1|2-3") where there are more."""
    if nproc == 1:
        return None
    cores = cores or os.cpu_count() or 1
    if cores < nproc:
        raise ValueError(f"{nproc} vLLM ranks need at least {nproc} cores to bind, this machine has {cores}")
    per = cores // nproc
    return "|".join(str(r * per) if per == 1 else f"{r * per}-{(r + 1) * per - 1}" for r in range(nproc))


def logged_collectives(log: str | Path) -> list[str]:
    """The distinct per-forward collective counts foe's plugin logged on each rank ("rank 0, forward 1: 5
    all-reduces per forward over 4 layers ..."), without the per-forward index."""
    import re
    lines = Path(log).read_text(errors="replace").splitlines() if Path(log).is_file() else []
    found = (re.search(r"foe: (rank \d+), forward \d+: (.*all-reduces per forward.*)", line) for line in lines)
    return sorted({f"{m.group(1)}: {m.group(2)}" for m in found if m})


def run_compare_vllm(cfg: CompareConfig, vllm_python: str | None = None, kv_cache_gib: int = 1,
                     vllm_args: tuple[str, ...] = (), progress: bool = True,
                     say: Callable[[str], None] = say_stderr) -> dict[str, Any]:
    """MoE (tp) then FoE (group parallel) inside vLLM at each arrival scale; writes and returns
    {config, engine, rows: [{scale_s, paper_scale_s, moe, foe, ratios}]} like `run_compare`."""
    if cfg.moe_strategy == "ep":
        raise ValueError(EP_SEGFAULT)
    if cfg.serve_args:
        raise ValueError("--serve-arg is for `foe serve`; with --engine vllm pass vLLM's arguments as --vllm-arg")
    python = vllm_python or sys.executable
    version = probe_vllm(vllm_python)
    bind = rank_binding(cfg.nproc)
    say(f"vLLM {version} in {python}; {cfg.nproc} tensor-parallel rank(s), binding {bind or 'auto'}")
    ckpts = {arch: bench_checkpoint(getattr(cfg, f"checkpoint_{arch}"), cfg.out_dir, cfg.preset, arch, cfg.seed, say)
             for arch in ("moe", "foe")}
    workload = longbench_dataset(cfg.num_prompts, get_tokenizer(str(ckpts["foe"])), cfg.prompt_format,  # type: ignore[arg-type]
                                 cfg.seed, cfg.longbench_scale, cfg.longbench_output_scale)
    out = Path(cfg.out_dir)
    rows: list[dict[str, Any]] = [{"scale_s": s * cfg.time_scale, "paper_scale_s": s} for s in cfg.paper_scales_s]
    t0 = time.perf_counter()
    for arch in ("moe", "foe"):
        label = f"vLLM {arch.upper()} {'tp' if arch == 'moe' else 'gp'}{cfg.nproc}"
        with contextlib.ExitStack() as stack:
            srv = vllm_server(python, ckpts[arch], out / f"server-vllm-{arch}.log", tensor_parallel_size=cfg.nproc,
                              kv_cache_gib=kv_cache_gib, threads_bind=bind, ready_timeout_s=cfg.ready_timeout_s,
                              extra_args=("--no-enable-prefix-caching", *vllm_args))
            stack.callback(srv.stop)
            model = start_warm(srv, workload[: cfg.warmup], label, say)
            for row in rows:
                bench = ServeBenchConfig(base_url=srv.url, model=model, request_rate=1.0 / row["scale_s"],
                                         burstiness=cfg.burstiness, seed=cfg.seed, ignore_eos=True)
                res = run_benchmark(bench, workload, progress=progress, desc=f"{label} scale {row['scale_s']:g}s")
                res.update(arch=arch, engine="vllm", scale_s=row["scale_s"], paper_scale_s=row["paper_scale_s"],
                           tensor_parallel_size=cfg.nproc, checkpoint=str(ckpts[arch]))
                row[arch] = res
                say(f"[{label}] scale {row['scale_s']:g} s: {res['completed']} ok, {res['failed']} failed, "
                    f"mean TTFT {res['mean_ttft_ms']:.0f} ms, mean TBT {res['mean_itl_ms']:.1f} ms, "
                    f"mean E2E {res['mean_e2el_ms']:.0f} ms")
    for row in rows:
        row["ratios"] = ratios(row["moe"], row["foe"])
    collectives = logged_collectives(out / "server-vllm-foe.log")
    for line in collectives:
        say(f"[vLLM FOE] {line}")
    result = {"config": {**asdict(cfg), "moe_strategy": "tp"}, "engine": "vllm", "versions": {"vllm": version},
              "threads_bind": bind, "foe_collectives": collectives, "wall_s": time.perf_counter() - t0,
              "rows": rows}
    write_json(result, out / "compare.json")
    plot_cdfs(rows, out / "latency_cdfs.png", title=f"inside vLLM {version}: {cfg.preset} MoE (tp) vs FoE (gp), "
                                                    f"{cfg.nproc} rank(s), {cfg.num_prompts} requests/scale")
    return result


__all__ = ["run_compare_vllm", "rank_binding", "EP_SEGFAULT"]
