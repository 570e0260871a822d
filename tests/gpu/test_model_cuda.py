"""The model on CUDA: MoE and FoE against the independent float64 reference (tests/model/reference.py),
cached decode and greedy generation against the full forward, and the grouped experts (torch._grouped_mm)
against the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from foe.generate import generate
from foe.model import experts
from foe.model.experts import GroupedExperts
from tests.conftest import build, tiny
from tests.gpu import CUDA
from tests.model.reference import reference_logits

pytestmark = CUDA

ARCHS = [("moe", "attention"), ("foe", "attention"), ("foe", "moe"), ("foe", "both")]
# float32 agrees to rounding (torch's float32 matmuls do not use TF32 unless told to). bf16 rounds every
# product's output: the same comparison on the CPU is off by at most 4.3e-3 on logits up to 0.65.
TOL = {torch.float32: dict(atol=5e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch,sync", ARCHS)
def test_logits_on_cuda_match_the_float64_reference(arch: str, sync: str, dtype: torch.dtype) -> None:
    # bf16 runs with every expert active (top_k = n_experts): routing is then continuous, so bf16 rounding
    # cannot flip a discrete expert choice and the tolerance holds for any draw. float32 routes top-k.
    cfg = tiny(arch, sync=sync, **({"top_k": 8} if dtype == torch.bfloat16 else {}))
    model = build(cfg).to("cuda", dtype)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    # the reference reads the weights the GPU model holds (bf16-rounded ones in bf16), in float64 on the CPU
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    ref = torch.stack([reference_logits(cfg, state, row.tolist()) for row in x])
    with torch.no_grad():
        out = model(x.cuda()).logits
    assert out.is_cuda and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("arch,sync", ARCHS)
def test_cached_decode_and_greedy_generation_on_cuda_equal_the_full_forward(arch: str, sync: str) -> None:
    model = build(tiny(arch, sync=sync)).cuda()
    x = torch.randint(0, 256, (3, 20), device="cuda")
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(3, 20)
        parts = [model(x[:, :7], cache=cache).logits]  # prefill a chunk
        parts.append(model(x[:, 7:12], pos_BL=torch.arange(7, 12, device="cuda").expand(3, 5), cache=cache).logits)
        parts += [model(x[:, t:t + 1], pos_BL=torch.full((3, 1), t, device="cuda"), cache=cache).logits
                  for t in range(12, 20)]
    assert cache.k.is_cuda
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)

    prompts = [[5, 6, 7, 8, 9], [1, 2], [100]]
    for p, o in zip(prompts, generate(model, prompts, 6)):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
        assert o == seq[len(p):]


def experts_pair(dtype: torch.dtype, d_model: int = 64, hidden: int = 48) -> tuple[GroupedExperts, GroupedExperts]:
    """Fast and loop experts with the same weights, on CUDA in `dtype`."""
    torch.manual_seed(0)
    fast = GroupedExperts(8, d_model, hidden, 0.2, 0.2, "grouped_mm")
    slow = GroupedExperts(8, d_model, hidden, 0.2, 0.2, "loop")
    slow.load_state_dict(fast.state_dict())
    return fast.to("cuda", dtype), slow.to("cuda", dtype)


# experts left empty, and a batch large enough that the CPU would stream it expert by expert
COUNTS = [0, 700, 3, 0, 1, 260, 64, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_grouped_experts_on_cuda_equal_the_loop(dtype: torch.dtype) -> None:
    fast, slow = experts_pair(dtype)
    counts = torch.tensor(COUNTS, device="cuda")
    x = torch.randn(sum(COUNTS), 64, device="cuda", dtype=dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert fast.path(x) == ("grouped_mm", None)  # on the CPU: ("streamed", None)
        torch.testing.assert_close(fast(x, counts), slow(x, counts), **tol)
    # training: gradients through torch._grouped_mm, empty experts included
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    assert fast.path(x1) == ("grouped_mm", None)
    y1, y2 = fast(x1, counts), slow(x2, counts)
    torch.testing.assert_close(y1, y2, **tol)
    y1.float().square().sum().backward()
    y2.float().square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(fast.w13.grad, slow.w13.grad, **tol)
    torch.testing.assert_close(fast.w2.grad, slow.w2.grad, **tol)


def test_experts_grouped_mm_cannot_take_run_one_by_one_with_a_warning() -> None:
    """float64 and sizes whose rows are not 16-byte multiples fall back, saying why, and still compute
    the loop's result."""
    experts._warn_fallback.cache_clear()  # it warns once per reason and process
    for dtype, d_model, hidden, why in ((torch.float64, 64, 48, "float64"), (torch.bfloat16, 64, 20, "16-byte")):
        fast, slow = experts_pair(dtype, d_model, hidden)
        counts = torch.tensor(COUNTS, device="cuda")
        x = torch.randn(sum(COUNTS), d_model, device="cuda", dtype=dtype)
        with torch.inference_mode(), pytest.warns(UserWarning, match=why):
            path, reason = fast.path(x)
            out = fast(x, counts)
        assert path == "streamed" and why in reason
        with torch.inference_mode():
            torch.testing.assert_close(out, slow(x, counts), atol=1e-12 if dtype == torch.float64 else 1e-2, rtol=0)
