"""Measure this machine for the `cpu-gloo` preset; writes src/foe/sim/data/cpu_measured.json.

Measures (1 thread per process, fp32):
- matmul FLOP/s at a few GEMM shapes and memory bandwidth (tensor copy), best of n;
- gloo all_reduce and all_to_all_single over 2 processes on 127.0.0.1 at a sweep of sizes, best
  of n (the CPU is shared, and the minimum is the link's cost without that noise);
- single-process forward latency (median) of the model (MoE and FoE) at a few batch shapes, so that the
  calibrated cost model can be checked against real forward passes, not only against collectives.
This is a measurement script (it imports torch and torch.distributed); the cost model never does.
`foe bench forward` JSON, when present, is the better calibration target for multi-rank runs.

    python -m foe.sim.measure_cpu --preset small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from foe.malloc import tune_malloc
from foe.sim.measurement import write_measurement

OUT = Path(__file__).parent / "data" / "cpu_measured.json"
SIZES = (4096, 65536, 262144, 1048576, 4194304)  # bytes per rank


def _time(fn, reps: int, best: bool = False) -> float:
    """Median of `reps` timed calls (or the minimum: the hardware's cost without CPU-sharing noise)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) if best else statistics.median(ts)


def _collectives(rank: int, world: int, reps: int, sizes: tuple[int, ...] = SIZES) -> list[dict]:
    import torch.distributed as dist
    res = []
    for n in sizes:
        x = torch.ones(n // 4)
        y = torch.empty_like(x)
        for op, fn in (("all_reduce", lambda: dist.all_reduce(x)),
                       ("all_to_all", lambda: dist.all_to_all_single(y, x))):
            dist.barrier()
            t = torch.tensor([_time(fn, reps, best=True)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the collective ends when the slowest rank does
            res.append(dict(op=op, ranks=world, bytes=n, seconds=float(t)))
    return res


def measure_compute(reps: int) -> dict:
    torch.set_num_threads(1)
    mm = []
    for m, k, n in ((512, 512, 512), (1024, 1024, 1024), (2048, 256, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        t = _time(lambda: a @ b, reps, best=True)
        mm.append(dict(m=m, k=k, n=n, seconds=t, flops_per_s=2 * m * k * n / t))
    src = torch.randn(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), reps, best=True)
    return dict(matmul=mm, copy=dict(bytes=2 * src.numel() * 4, seconds=t, bytes_per_s=2 * src.numel() * 4 / t))


def measure_forward(preset: str, reps: int) -> list[dict]:
    from foe.config import ModelConfig
    from foe.model import Transformer
    torch.set_num_threads(1)
    rows = []
    for arch in ("moe", "foe"):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(preset, arch=arch)
        model = Transformer(cfg).eval()
        for seqs, length in ((1, 64), (4, 128), (8, 256), (16, 512)):
            if length > cfg.max_seq_len:
                continue
            ids = torch.randint(0, cfg.vocab_size, (seqs, length))
            last = torch.arange(seqs) * length + length - 1
            with torch.no_grad():
                t = _time(lambda: model(ids, logits_at=last), reps)
            rows.append(dict(preset=preset, arch=arch, strategy="ep" if arch == "moe" else "gp", ranks=1,
                             seqs=seqs, seq_len=length, seconds=t))
            print(f"forward {arch} {seqs}x{length}: {t * 1e3:.2f} ms")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="collective sizes, bytes per rank")
    p.add_argument("--collectives-only", action="store_true",
                   help="only the collectives: on the ranks torchrun (or `foe cluster job`) started, when it did")
    args = p.parse_args(argv)
    tune_malloc()  # the same allocator settings as the `foe` commands whose runs this calibrates against
    from foe.parallel import run_ranks
    from foe.parallel.rendezvous import Rendezvous
    sizes = tuple(int(x) for x in args.sizes.split(","))
    coll = run_ranks(_collectives, Rendezvous.from_env() or 2, args.reps, sizes, threads_per_rank=1)
    if coll is None:  # a rank other than 0: rank 0 writes
        return 0
    coll = coll[0]
    for c in coll:
        print(f"{c['op']:10s} {c['ranks']} ranks {c['bytes']:>8d} B: {c['seconds'] * 1e3:.3f} ms")
    if args.collectives_only:
        write_measurement(args.out, "foe.sim.measure_cpu", argv, torch=torch.__version__, threads_per_process=1,
                          dtype="float32", collectives=coll)
        return 0
    comp = measure_compute(args.reps)
    print(f"matmul GFLOP/s: {[round(m['flops_per_s'] / 1e9, 1) for m in comp['matmul']]}; "
          f"copy {comp['copy']['bytes_per_s'] / 1e9:.1f} GB/s")
    fwd = measure_forward(args.preset, args.reps)
    write_measurement(args.out, "foe.sim.measure_cpu", argv, torch=torch.__version__, threads_per_process=1,
                      dtype="float32", collectives=coll, compute=comp, forward=fwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
