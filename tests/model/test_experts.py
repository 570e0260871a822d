"""The fast expert path against a plain per-token reference and against the per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from foe.model.experts import GroupedExperts
from foe.model.ffn import MoEFeedForward
from foe.model.router import TopKRouter


def per_token_reference(ffn: MoEFeedForward, x_GTD: torch.Tensor) -> torch.Tensor:
    """Route and apply experts one token at a time, straight from the definitions."""
    r, ex = ffn.router, ffn.experts
    G, T, D = x_GTD.shape
    e = r.weight.shape[2]
    out = torch.zeros_like(x_GTD)
    for g in range(G):
        for t in range(T):
            logits = x_GTD[g, t] @ r.weight[g]
            probs = logits.softmax(-1) if r.score == "softmax" else logits.sigmoid()
            w, idx = probs.topk(r.top_k)
            if r.renorm:
                w = w / w.sum()
            for wi, j in zip(w, idx.tolist()):
                E = g * e + j
                gate, up = (x_GTD[g, t] @ ex.w13[E]).chunk(2)
                out[g, t] += wi * ((F.silu(gate) * up) @ ex.w2[E])
    return out


def make_ffn(G: int, e: int, A: int, impl: str, score: str = "softmax", renorm: bool = True) -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(TopKRouter(G, 32, e, A, score, renorm, 0.2), GroupedExperts(G * e, 32, 24, 0.2, 0.2, impl))


@pytest.mark.parametrize("G,e,A", [(1, 8, 2), (4, 2, 1), (2, 4, 3)])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("score,renorm", [("softmax", True), ("sigmoid", False)])
def test_ffn_matches_per_token_reference(G: int, e: int, A: int, impl: str, score: str, renorm: bool) -> None:
    ffn = make_ffn(G, e, A, impl, score, renorm)
    x = torch.randn(G, 37, 32)
    y, r = ffn(x)
    torch.testing.assert_close(y, per_token_reference(ffn, x), atol=1e-5, rtol=1e-4)
    assert int(r.counts_E.sum()) == G * 37 * A


def test_grouped_mm_equals_loop_with_empty_experts_and_gradients() -> None:
    fast, slow = make_ffn(1, 8, 2, "grouped_mm").experts, make_ffn(1, 8, 2, "loop").experts
    counts = torch.tensor([3, 0, 5, 0, 0, 7, 1, 0])
    x1 = torch.randn(int(counts.sum()), 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = fast(x1, counts), slow(x2, counts)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.w13.grad, slow.w13.grad, atol=1e-5, rtol=1e-4)
    assert fast(torch.zeros(0, 32), torch.zeros(8, dtype=torch.long)).shape == (0, 32)


@pytest.mark.parametrize("rows_per_expert", [2, 200])  # below and above the streamed path's threshold
def test_default_impl_runs_float64_and_equals_the_loop(rows_per_expert: int) -> None:
    """torch._grouped_mm has no float64: the default impl computes float64 expert by expert instead,
    with and without gradients, exactly as the loop does (including float64 training, with its losses)."""
    fast, slow = (make_ffn(1, 8, 2, impl).double().experts for impl in ("grouped_mm", "loop"))
    counts = torch.tensor([1, 0, 3, 0, 0, 2, 1, 1]) * rows_per_expert
    x = torch.randn(int(counts.sum()), 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fast(x, counts), slow(x, counts))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast(x1, counts).square().sum().backward()
    slow(x2, counts).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(fast.w13.grad, slow.w13.grad)
    ffn = make_ffn(2, 4, 1, "grouped_mm").double().train()
    y, r = ffn(torch.randn(2, 9, 32, dtype=torch.float64))
    assert y.dtype == r.weights_GTA.dtype == r.aux_loss.dtype == r.z_loss.dtype == torch.float64


def test_balance_loss_is_one_when_uniform_and_larger_when_skewed() -> None:
    router = TopKRouter(1, 4, 4, 1, "softmax", True, 0.0)
    x = torch.randn(1, 64, 4)
    assert abs(router(x).aux_loss.item() - 1.0) < 1e-5  # zero weights: uniform probs -> e * sum(f/e) = 1
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, :, 0] = 10.0
    skewed = router(torch.ones(1, 64, 4)).aux_loss.item()
    assert skewed > 3.5  # nearly everything on one expert: loss -> e = 4


def test_router_losses_only_in_train_mode() -> None:
    """The balance and z losses are training signals: eval mode (serving, benchmarks) skips them and
    reports zeros, while the routing itself is the same in both modes."""
    torch.manual_seed(0)
    router = TopKRouter(2, 8, 4, 1, "softmax", True, 0.5)
    x = torch.randn(2, 32, 8)
    train, inference = router.train()(x), router.eval()(x)
    assert train.aux_loss > 0 and train.z_loss > 0
    assert inference.aux_loss == 0 and inference.z_loss == 0
    assert torch.equal(train.experts_GTA, inference.experts_GTA) and torch.equal(train.counts_E, inference.counts_E)
    torch.testing.assert_close(train.weights_GTA, inference.weights_GTA)


def test_path_per_device_and_why_not_grouped() -> None:
    """On the CPU, inference streams wherever oneDNN applies or batches are large, training takes the grouped
    product; float64 (no torch._grouped_mm) goes expert by expert and says why."""
    from foe.model.experts import STREAM_MIN_ROWS_PER_EXPERT
    experts = make_ffn(1, 8, 2, "grouped_mm").experts
    small, large = torch.randn(5, 32), torch.randn(8 * STREAM_MIN_ROWS_PER_EXPERT, 32)
    assert experts.path(small) == ("grouped_mm", None)  # parameters require grad: training
    with torch.no_grad():
        assert experts.path(large) == ("streamed", None)
        path, why = experts.double().path(large.double())
        assert path == "streamed" and "float64" in why
    assert experts.path(small.double())[0] == "loop"
    assert make_ffn(1, 8, 2, "loop").experts.path(small) == ("loop", None)


@pytest.mark.parametrize("d_model,hidden,dtype", [(30, 24, torch.float32), (32, 12, torch.bfloat16)])
def test_sizes_grouped_mm_cannot_take_fall_back_and_equal_the_loop(d_model: int, hidden: int,
                                                                    dtype: torch.dtype) -> None:
    """torch._grouped_mm refuses row strides that are not multiples of 16 bytes (it raised here before):
    such experts run expert by expert instead, with and without gradients."""
    torch.manual_seed(0)
    fast = GroupedExperts(4, d_model, hidden, 0.2, 0.2, "grouped_mm").to(dtype)
    slow = GroupedExperts(4, d_model, hidden, 0.2, 0.2, "loop").to(dtype)
    slow.load_state_dict(fast.state_dict())
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, d_model, dtype=dtype, requires_grad=True)
    path, why = fast.path(x)
    assert path == "loop" and "16-byte" in why
    y = fast(x, counts)
    assert torch.equal(y, slow(x, counts))
    y.sum().backward()
    assert fast.w13.grad is not None
    with torch.no_grad():
        assert torch.equal(fast(x, counts), slow(x, counts))
