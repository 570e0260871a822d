"""The engine on CUDA: the KV pool and every step on the GPU (torch path: the native decode kernel is for
the CPU), outputs equal to `foe.generate` on the same GPU model, logprobs equal to the full forward's, and
the single-process benchmarks' CUDA runs."""

from __future__ import annotations

import random

import pytest
import torch

from foe.bench.engine_step import StepBenchConfig, run_step_bench
from foe.bench.model_latency import ModelBenchConfig, run_model_bench
from foe.engine.engine import LLMEngine
from foe.engine.request import RequestParams
from foe.engine.runner import ModelRunner
from foe.engine.sampler import SamplingParams
from foe.engine.scheduler import SchedulerConfig
from foe.generate import generate
from tests.conftest import build, tiny
from tests.engine.test_engine import random_prompts, staggered
from tests.gpu import CUDA

pytestmark = CUDA


@pytest.mark.parametrize("arch,blocks,prefix", [("foe", 64, False), ("moe", 64, False), ("foe", 14, False),
                                                ("foe", 64, True)])
def test_engine_on_cuda_equals_generate(arch: str, blocks: int, prefix: bool) -> None:
    """Continuous batching, chunked prefill, preemption (14 blocks) and prefix caching on the GPU."""
    model = build(tiny(arch)).cuda()
    prompts = random_prompts(14, seed=1)
    if prefix:
        prompts = [prompts[0] + p for p in prompts]
    rng = random.Random(2)
    max_tokens = [rng.randint(1, 12) for _ in prompts]
    ref = [generate(model, [p], n)[0] for p, n in zip(prompts, max_tokens)]
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=blocks, block_size=4, max_num_batched_tokens=24,
                                                         max_num_seqs=6, enable_prefix_caching=prefix))
    runner = engine.executor.runner
    assert runner.pool.k.is_cuda and not runner.paged_kernel
    assert staggered(engine, prompts, max_tokens) == ref
    if blocks == 14:
        assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_on_cuda_matches_generate_and_the_cpu() -> None:
    """Seeded draws come from CPU generators, so the GPU samples the CPU's tokens wherever the two devices'
    distributions agree to rounding (a draw landing within rounding of a token boundary could differ)."""
    model = build(tiny("foe"))
    prompts = random_prompts(4, seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3)
    engine = LLMEngine.from_model(model.cuda(), SchedulerConfig(num_blocks=64, block_size=4))
    outs = engine.generate(prompts, RequestParams(params, max_tokens=8, ignore_eos=True))
    assert outs == [generate(model, [p], 8, params)[0] for p in prompts]
    cpu = [generate(model.cpu(), [p], 8, params)[0] for p in prompts]
    assert sum(a == b for a, b in zip(outs, cpu)) >= len(prompts) - 1


def test_prompt_and_generated_logprobs_on_cuda_are_the_models() -> None:
    model = build(tiny("moe")).cuda()
    prompts = random_prompts(3, seed=3, lo=5, hi=30)
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=7))
    seqs = [engine.add_request(p, RequestParams(max_tokens=3, prompt_logprobs=2, logprobs=2, ignore_eos=True))
            for p in prompts]
    while engine.has_unfinished:
        engine.step()
    for p, s in zip(prompts, seqs):
        with torch.no_grad():
            lp = model(torch.tensor([p + s.output_ids], device="cuda")).logits[0].log_softmax(-1).cpu()
        ids = torch.tensor(p + s.output_ids)
        got = torch.tensor([e.logprob for e in s.prompt_logprobs[1:]])
        torch.testing.assert_close(got, lp[torch.arange(len(p) - 1), ids[1:len(p)]], atol=1e-5, rtol=1e-5)
        assert [t for t, _ in s.prompt_logprobs[1].top] == lp[0].topk(2).indices.tolist()
        for i, e in enumerate(s.output_logprobs):
            row = lp[len(p) - 1 + i]
            assert e.token_id == s.output_ids[i] == int(row.argmax()) and abs(e.logprob - float(row[e.token_id])) < 1e-5


def test_the_native_kernel_is_refused_on_cuda() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        ModelRunner(build(tiny("moe")).cuda(), num_blocks=4, block_size=4, paged_kernel=True)


def test_benchmarks_run_on_cuda() -> None:
    """foe bench model and foe bench step on the GPU: synchronised wall clock, the GPU's floor, no kernel row."""
    res = run_model_bench(ModelBenchConfig(preset="tiny", batch_sizes=(2,), seq_lens=(8,), repeats=2,
                                           device="cuda"), log=lambda _: None)
    assert res["settings"]["clock"] == "wall" and res["machine"]["device"] == torch.cuda.get_device_name()
    assert all(t["median_ms"] > 0 for r in res["rows"] for t in r["timings"].values())
    with pytest.raises(ValueError, match="wall clock on cuda"):
        ModelBenchConfig(preset="tiny", clock="cpu", threads=1, device="cuda")
    step = run_step_bench(StepBenchConfig(preset="tiny", batch=4, context=20, chunk=16, repeats=2, device="cuda"),
                          log=lambda _: None)
    assert set(step["runner_ms"]) == {"decode torch", "decode dense", "mixed torch"}
    assert set(step["paging_overhead"]) == {"torch"}
