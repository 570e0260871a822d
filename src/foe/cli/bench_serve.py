"""`foe bench serve` (load-test any OpenAI-compatible server), `foe bench compare` (the paper's
MoE-vs-FoE serving experiment) and `foe bench vs-vllm` (`foe serve` against vLLM on one checkpoint).
Argument parsing only; the work is in foe.bench.serving*."""

from __future__ import annotations

import argparse
import os
import math

from foe.bench.datasets import DEFAULT_LONGBENCH_OUTPUT_SCALE, DEFAULT_LONGBENCH_SCALE, LONGBENCH_TASKS
from foe.cli.common import add_device_arg, add_dtype_arg, number_list


_floats = number_list(float)


def _add_workload_args(p: argparse.ArgumentParser, longbench_only: bool = False) -> None:
    g = p.add_argument_group("workload")
    if not longbench_only:
        g.add_argument("--dataset-name", choices=("random", "longbench", "jsonl"), default="random",
                       help="random tokens, the LongBench-like mix, or your own JSON-lines files (default random)")
        g.add_argument("--dataset-path", nargs="+", metavar="FILE",
                       help="jsonl: files with `prompt` or `context`+`input`")
        g.add_argument("--random-input-len", type=int, default=256)
        g.add_argument("--random-output-len", type=int, default=32)
        g.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths uniform in [L(1-r), L(1+r)] (default 0: fixed)")
        g.add_argument("--jsonl-output-len", type=int, default=32,
                       help="answer length for rows without max_tokens or a known LongBench `dataset`")
        g.add_argument("--max-prompt-len", type=int, default=None,
                       help="jsonl: truncate longer prompts in the middle, as LongBench does")
    g.add_argument("--longbench-scale", type=float, default=DEFAULT_LONGBENCH_SCALE,
                   help=f"prompt lengths x this (paper mean ~9.1k tokens; default {DEFAULT_LONGBENCH_SCALE:g})")
    g.add_argument("--longbench-output-scale", type=float, default=DEFAULT_LONGBENCH_OUTPUT_SCALE,
                   help=f"answer budgets (32 or 128 tokens) x this (default {DEFAULT_LONGBENCH_OUTPUT_SCALE:g})")
    g.add_argument("--prompt-format", choices=("text", "ids"), default="text",
                   help="send prompts as text or as lists of token ids (default text)")
    if not longbench_only:
        g.add_argument("--tokenizer", metavar="PATH", default=None,
                       help="the server's tokenizer.json (or checkpoint dir) to size prompts; default byte-level")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("serve", help="load-test an OpenAI-compatible /v1/completions server (vLLM-style)",
                         description="Send a workload with Poisson/gamma arrivals over streaming completions and "
                                     "report TTFT, TPOT, ITL and E2E latency with vLLM's definitions and JSON keys.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name (default: the first one at /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second, Poisson arrivals (default inf: all at once)")
    rate.add_argument("--scale", type=float, default=None,
                      help="the paper's arrival scale: mean inter-arrival time in seconds (= 1 / rate)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson (default)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per request")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el", help="metrics to report (default all)")
    p.add_argument("--metric-percentiles", type=_floats, default=(50.0, 99.0), help="default 50,99")
    p.add_argument("--result-file", default=None, metavar="JSON", help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    _add_workload_args(p)
    p.set_defaults(func=serve)

    p = bench.add_parser("compare", help="the paper's serving experiment: MoE vs FoE under Poisson arrivals",
                         description="Start `foe serve` for MoE (--moe-strategy) and FoE (gp) in turn, send the same "
                                     "LongBench-like workload at the paper's arrival scales (0.5, 0.75, 1.5 s) x "
                                     "--time-scale, and print MoE time / FoE time for TTFT, TBT and E2E.")
    p.add_argument("--preset", default="small", help="model size for both (default small)")
    p.add_argument("--checkpoint-moe", default=None, metavar="DIR")
    p.add_argument("--checkpoint-foe", default=None, metavar="DIR")
    p.add_argument("--moe-strategy", choices=("ep", "tp"), default=None,
                   help="the MoE baseline's parallelism (default ep; tp with --engine vllm, whose ep crashes on the CPU)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per server, the same for both (default 2)")
    add_device_arg(p)
    add_dtype_arg(p, auto="the checkpoints' stored dtype, float32 for random weights (foe serve's; --engine foe)")
    p.add_argument("--scales", type=_floats, default=(0.5, 0.75, 1.5),
                   help="the paper's arrival scales, s (default 0.5,0.75,1.5)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the paper's scales by this for a slower or faster machine (default 1)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per scale (default 64)")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests after a server starts (default 2)")
    p.add_argument("--out", default="runs/serving-compare", metavar="DIR", help="JSON, PNG and server logs go here")
    p.add_argument("--cluster", default=os.environ.get("FOE_CLUSTER"), metavar="NAME",
                   help="run each server as a job on every rank of this emulated cluster (`foe cluster`; default: "
                        "$FOE_CLUSTER, which `foe cluster run --driver` sets); --nproc must be its ranks")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `foe serve` (repeatable, e.g. --serve-arg=--max-num-seqs=16)")
    p.add_argument("--no-progress", action="store_true")
    v = p.add_argument_group("inside vLLM (issue 14)")
    v.add_argument("--engine", choices=("foe", "vllm"), default="foe",
                   help="serve both with `foe serve` (default) or with vLLM and foe's plugin, one at a time: "
                        "FoE as group parallel, MoE as vLLM's tensor parallel, --nproc ranks each")
    v.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="interpreter with vLLM and foe's plugin (default: this one, if it has them)")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="extra vLLM server argument")
    v.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM's KV cache per server, whole GiB (default 1)")
    _add_workload_args(p, longbench_only=True)
    p.set_defaults(func=compare)
    _register_vs_vllm(bench)


def _register_vs_vllm(bench: argparse._SubParsersAction) -> None:
    from foe.bench.vs_vllm_config import SCENARIOS, VsVllmConfig
    d = VsVllmConfig()
    p = bench.add_parser("vs-vllm", help="foe serve against vLLM (foe's plugin) on one checkpoint, the same load",
                         description="Start vLLM and `foe serve` one at a time on the same checkpoint (default: a "
                                     "random-weight preset written under --out), send both the same random "
                                     "workload in each scenario (all at once, a fixed Poisson rate, one at a time), "
                                     "repeat with the order alternated, and print foe / vLLM for throughput, TTFT, "
                                     "TPOT and E2E. Writes vs_vllm.json, vs_vllm.png and both servers' logs.")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default=None, metavar="DIR", help="checkpoint directory with tokenizer.json")
    m.add_argument("--preset", default=d.preset, help=f"without --checkpoint (default {d.preset})")
    m.add_argument("--arch", choices=("moe", "foe"), default=d.arch, help=f"without --checkpoint (default {d.arch})")
    m.add_argument("--seed", type=int, default=d.seed, help="weights and workload seed (default 0)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="both servers (default float32)")
    w = p.add_argument_group("workload")
    w.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)} (default all)")
    w.add_argument("--num-prompts", type=int, default=d.num_prompts,
                   help=f"requests in the saturation and rate scenarios (default {d.num_prompts})")
    w.add_argument("--single-prompts", type=int, default=d.single_prompts,
                   help=f"requests sent one at a time (default {d.single_prompts})")
    w.add_argument("--request-rate", type=float, default=d.request_rate,
                   help=f"Poisson arrivals of the rate scenario, req/s (default {d.request_rate:g})")
    w.add_argument("--random-input-len", type=int, default=d.input_len, help=f"default {d.input_len}")
    w.add_argument("--random-output-len", type=int, default=d.output_len, help=f"default {d.output_len}")
    w.add_argument("--repeats", type=int, default=d.repeats, help=f"A/B repeats, order alternated (default {d.repeats})")
    w.add_argument("--warmup", type=int, default=d.warmup, help=f"unmeasured requests per server start (default {d.warmup})")
    s = p.add_argument_group("servers")
    s.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="interpreter with vLLM and foe's plugin (default: this one, if it has them)")
    s.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help=f"both servers (default {d.max_num_seqs})")
    s.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help=f"tokens per step, both servers (default {d.max_num_batched_tokens})")
    s.add_argument("--kv-cache-gib", type=int, default=d.kv_cache_gib,
                   help="vLLM's KV cache, GiB (foe sizes its own: at most 1 GiB by default)")
    s.add_argument("--foe-threads", type=int, default=d.foe_threads,
                   help="OMP_NUM_THREADS of foe serve (default: unset, foe's own choice: the cores less one, "
                        "as vLLM's)")
    s.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="extra `foe serve` argument")
    s.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="extra vLLM server argument")
    p.add_argument("--out", default=d.out_dir, metavar="DIR", help=f"results and logs (default {d.out_dir})")
    p.add_argument("--no-progress", action="store_true", help="no per-request bars (a line per run remains)")
    p.set_defaults(func=vs_vllm)


def serve(args: argparse.Namespace) -> int:
    from foe.bench.datasets import get_tokenizer, jsonl_dataset, longbench_dataset, random_dataset
    from foe.bench.serving import ServeBenchConfig, rate_from_scale, run_benchmark, write_json
    from foe.bench.serving_metrics import format_table

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    rate = rate_from_scale(args.scale) if args.scale is not None else args.request_rate
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    cfg = ServeBenchConfig(base_url=args.base_url, model=args.model, request_rate=rate, burstiness=args.burstiness,
                           max_concurrency=args.max_concurrency, seed=args.seed, ignore_eos=args.ignore_eos,
                           percentiles=tuple(args.metric_percentiles), metrics=metrics)
    tok = get_tokenizer(args.tokenizer)
    if args.dataset_name == "random":
        reqs = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                              args.random_range_ratio, tok, args.prompt_format, args.seed)
    elif args.dataset_name == "longbench":
        reqs = longbench_dataset(args.num_prompts, tok, args.prompt_format, args.seed,
                                 args.longbench_scale, args.longbench_output_scale, tuple(LONGBENCH_TASKS))
    else:
        if not args.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path FILE [FILE ...]")
        reqs = jsonl_dataset(args.dataset_path, args.num_prompts, tok, args.prompt_format, args.seed,
                             args.jsonl_output_len, args.max_prompt_len)
    res = run_benchmark(cfg, reqs, progress=not args.no_progress,
                        count_text=lambda s: len(tok.encode(s).ids))
    res["dataset_name"] = args.dataset_name
    print(format_table(res, cfg.percentiles, cfg.metrics))
    if args.result_file:
        print(f"wrote {write_json(res, args.result_file)}")
    return 0


def compare(args: argparse.Namespace) -> int:
    from foe.bench.serving_compare import CompareConfig, format_compare_table, run_compare

    if args.engine == "foe" and (args.vllm_python or args.vllm_arg):
        raise ValueError("--vllm-python and --vllm-arg need --engine vllm")
    strategy = args.moe_strategy or ("tp" if args.engine == "vllm" else "ep")
    if args.cluster:
        from foe.cluster.jobs import load_spec
        if args.engine != "foe":
            raise ValueError("--cluster runs foe serve; vLLM's own launcher is not wired to emulated clusters")
        world = load_spec(args.cluster).world_size
        if args.nproc != world:
            raise ValueError(f"cluster {args.cluster} has {world} ranks: pass --nproc {world}")
    cfg = CompareConfig(out_dir=args.out, preset=args.preset, checkpoint_moe=args.checkpoint_moe,
                        checkpoint_foe=args.checkpoint_foe, moe_strategy=strategy, nproc=args.nproc,
                        paper_scales_s=tuple(args.scales), time_scale=args.time_scale, num_prompts=args.num_prompts,
                        longbench_scale=args.longbench_scale, longbench_output_scale=args.longbench_output_scale,
                        prompt_format=args.prompt_format, burstiness=args.burstiness, seed=args.seed,
                        warmup=args.warmup, serve_args=tuple(args.serve_arg), device=args.device, dtype=args.dtype,
                        cluster=args.cluster)
    if args.engine == "vllm":
        from foe.bench.serving_compare_vllm import run_compare_vllm
        result = run_compare_vllm(cfg, args.vllm_python, args.kv_cache_gib, tuple(args.vllm_arg),
                                  progress=not args.no_progress)
    else:
        result = run_compare(cfg, progress=not args.no_progress)
    print(format_compare_table(result["rows"]))
    print(f"wrote {args.out}/compare.json and {args.out}/latency_cdfs.png ({result['wall_s']:.0f} s)")
    return 0


def vs_vllm(args: argparse.Namespace) -> int:
    from foe.bench.serving_vs_vllm import VsVllmConfig, format_ratio_table, run_vs_vllm

    cfg = VsVllmConfig(out_dir=args.out, checkpoint=args.checkpoint, preset=args.preset, arch=args.arch,
                       seed=args.seed, dtype=args.dtype, vllm_python=args.vllm_python,
                       scenarios=tuple(x.strip() for x in args.scenarios.split(",") if x.strip()),
                       num_prompts=args.num_prompts, single_prompts=args.single_prompts,
                       request_rate=args.request_rate, input_len=args.random_input_len,
                       output_len=args.random_output_len, repeats=args.repeats, warmup=args.warmup,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_gib=args.kv_cache_gib, foe_threads=args.foe_threads,
                       serve_args=tuple(args.serve_arg), vllm_args=tuple(args.vllm_arg))
    result = run_vs_vllm(cfg, progress=not args.no_progress)
    print(format_ratio_table(result["rows"]))
    print(f"wrote {args.out}/vs_vllm.json and {args.out}/vs_vllm.png ({result['wall_s']:.0f} s)")
    return 0
