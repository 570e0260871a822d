"""Several GPUs under foe's launcher: NCCL, one GPU per local rank, and every strategy's logits equal to the
same model on one GPU (the CPU parity cases of tests/parallel/test_parity.py, on CUDA)."""

from __future__ import annotations

import pytest
import torch

from foe.parallel import run_ranks
from foe.parallel.rendezvous import Rendezvous
from tests.gpu import CUDA
from tests.parallel.test_parity import CASES_2
from tests.parallel.workers import parity_worker, placement_worker

pytestmark = [*CUDA, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]
TOL = 1e-4  # float32 on the GPU; a reduction order of its own per layout


def test_ranks_take_one_gpu_each_over_nccl() -> None:
    got = run_ranks(placement_worker, Rendezvous(nproc=2, device="cuda"), timeout_s=300)
    assert got == [("cuda:0", "nccl"), ("cuda:1", "nccl")]


def test_every_strategy_over_nccl_matches_one_gpu() -> None:
    results = run_ranks(parity_worker, Rendezvous(nproc=2, device="cuda"), CASES_2, timeout_s=600)
    for rank, per_case in enumerate(results):
        for case, res in zip(CASES_2, per_case):
            assert res["diff"] < TOL, f"{case['name']} rank {rank}: max |logit diff| {res['diff']:.2e}"
