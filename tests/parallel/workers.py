"""Rank functions for the distributed tests (module level, so spawned processes can import them).

Each rank builds the same seeded model, keeps a single-process copy as the reference, parallelizes the
other, runs prefill + decode with a KV cache on its data-parallel shard, and reports the largest
difference from the reference's logits for the same rows, plus its communication ledger.
"""

from __future__ import annotations

import copy

import torch

from foe.config import ModelConfig
from foe.parallel import ParallelDims, parallelize
from foe.parallel.launch import rank_device
from tests.conftest import build


def shard_rows(B: int, dp: int, split: list[list[int]] | None) -> list[list[int]]:
    return split if split is not None else [list(range(j, B, dp)) for j in range(dp)]


def case_tokens(model_cfg: ModelConfig, B: int, n: int) -> torch.Tensor:
    return torch.randint(0, model_cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(11))


def run_case(model_cfg: ModelConfig, dims: ParallelDims, rank: int, B: int, L: int, decode_steps: int,
             split: list[list[int]] | None = None) -> dict:
    dev = rank_device()  # the CPU under gloo; this rank's GPU under NCCL (tests/gpu)
    model = build(model_cfg, seed=3).to(dev)
    ref = copy.deepcopy(model)
    tokens = case_tokens(model_cfg, B, L + decode_steps).to(dev)
    rows = shard_rows(B, dims.dp_size, split)[dims.dp_rank(rank)]

    def run(m: torch.nn.Module, idx: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = tokens[idx]
        cache = m.new_cache(len(idx), L + decode_steps)
        out = m(x[:, :L], cache=cache)
        logits, counts = [out.logits], [out.expert_counts]
        for t in range(L, L + decode_steps):
            out = m(x[:, t:t + 1], pos_BL=torch.full((len(idx), 1), t, dtype=torch.long, device=dev), cache=cache)
            logits.append(out.logits)
            counts.append(out.expert_counts)
        return logits, counts

    with torch.no_grad():
        want, ref_counts = run(ref, list(range(B)))
        comm = parallelize(model, dims, rank)
        got, _ = run(model, rows)
    shares = {"kv_heads": model.layers[0].attn.num_kv_heads,
              "experts": model.layers[0].ffn.experts.local.num_experts,
              "params": sum(p.numel() for p in model.parameters())}
    diff = max(float((a - w[rows]).abs().max()) if rows else 0.0 for a, w in zip(got, want))
    return {"diff": diff, "rows": rows, "shares": shares, "summary": comm.ledger.summary(),
            "records": [vars(r) for r in comm.ledger.records],
            "decode_has_idle_expert": bool(any((c == 0).any() for c in ref_counts[1:]))}


def parity_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        cfg = ModelConfig.from_preset("tiny", **case["cfg"])
        dims = ParallelDims(world_size=world, **case["dims"])
        out.append(run_case(cfg, dims, rank, case["B"], case["L"], case["steps"], case.get("split")))
    return out


def dying_worker(rank: int, world: int) -> None:
    import os

    import torch.distributed as dist
    if rank == 1:
        os._exit(3)  # a crashed worker: no exception, no goodbye
    dist.barrier()  # rank 0 would wait here forever without the launcher's watchdog


def placement_worker(rank: int, world: int) -> tuple[str, str]:
    """This rank's device and process-group backend, as the launcher chose them."""
    import torch.distributed as dist
    return str(rank_device()), dist.get_backend()


def raising_worker(rank: int, world: int) -> None:
    """Rank 1 raises while rank 0 waits for a message from it."""
    import torch.distributed as dist
    if rank == 1:
        raise ValueError("rank 1 says no")
    dist.recv(torch.zeros(1), src=1)


def collective_count_worker(rank: int, world: int, cases: list[dict]) -> list[dict[str, int]]:
    """For each case, the collectives one prefill forward issued on this rank, by op."""
    from collections import Counter
    out = []
    for case in cases:
        cfg = ModelConfig.from_preset("tiny", **case["cfg"])
        dims = ParallelDims(world_size=world, **case["dims"])
        model = build(cfg, seed=3)
        comm = parallelize(model, dims, rank)
        rows = shard_rows(4, dims.dp_size, None)[dims.dp_rank(rank)]
        with torch.no_grad():
            model(case_tokens(cfg, 4, 6)[rows])
        out.append(dict(Counter(r.op for r in comm.ledger.records)))
    return out
