"""oneDNN products on pre-packed weights against the plain products they replace."""

from __future__ import annotations

import pytest
import torch

from foe.model import packed_matmul
from foe.model.experts import GroupedExperts

pytestmark = pytest.mark.skipif(not packed_matmul.available(), reason="this PyTorch build has no oneDNN linear ops")


@pytest.fixture(autouse=True)
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack whatever the size, so these small products take the oneDNN path."""
    monkeypatch.setattr(packed_matmul, "MIN_MACS", 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_products_equal_plain_ones(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 48, 80, generator=g).to(dtype))
    with torch.inference_mode():
        for rows in (1, 7, 64, 300):  # any row count, not only the packing hint
            x = torch.randn(rows, 48, generator=g).to(dtype)
            ref = (x.double() @ w[1].double())
            torch.testing.assert_close(packed_matmul.matmul(x, w, 1).double(), ref, rtol=tol, atol=tol * ref.abs().max())
        xg = torch.randn(3, 10, 48, generator=g).to(dtype)
        ref = torch.bmm(xg.double(), w.double())
        torch.testing.assert_close(packed_matmul.group_matmul(xg, w).double(), ref, rtol=tol, atol=tol * ref.abs().max())
    assert set(w.__dict__["_foe_onednn"]) == {0, 1, 2}  # packed once per expert, kept


def test_a_weight_changed_in_place_is_packed_again() -> None:
    w = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        before = packed_matmul.matmul(x, w)
    with torch.no_grad():
        w.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(packed_matmul.matmul(x, w), 2 * before)


def test_training_autocast_and_float64_take_the_plain_product() -> None:
    w = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 16)
    assert not packed_matmul.applies(x, w)  # autograd on
    with torch.inference_mode():
        assert packed_matmul.applies(x, w)
        assert not packed_matmul.applies(x.double(), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not packed_matmul.applies(x, w)
    y = packed_matmul.matmul(x, w)
    assert y.requires_grad  # plain x @ w, differentiable


def test_packed_experts_equal_the_loop() -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(8, 32, 24, 0.1, 0.1)
    counts = torch.tensor([5, 0, 9, 1, 0, 30, 2, 3])
    x = torch.randn(int(counts.sum()), 32)
    with torch.inference_mode():
        fast = ex(x, counts)
        assert "_foe_onednn" in ex.w13.__dict__  # the packed path ran
        torch.testing.assert_close(fast, ex._loop(x, counts), rtol=1e-5, atol=1e-6)


def test_small_products_stay_with_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_matmul, "MIN_MACS", 1 << 19)
    w = torch.nn.Parameter(torch.randn(256, 512))
    with torch.inference_mode():
        assert not packed_matmul.applies(torch.randn(1, 256), w)  # a one-token decode: oneDNN's call costs more
        assert packed_matmul.applies(torch.randn(64, 256), w)


def test_packed_linear_equals_f_linear() -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(300, 48, generator=g))
    x = torch.randn(2, 5, 48, generator=g)  # any leading shape
    with torch.inference_mode():
        y = packed_matmul.linear(x, weight)
        assert "linear" in weight.__dict__["_foe_onednn"]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_weights_built_under_inference_mode_are_packed() -> None:
    """A model built inside inference_mode (as `foe bench forward`'s ranks do) has inference tensors,
    which keep no version counter."""
    with torch.inference_mode():
        w = torch.nn.Parameter(torch.randn(16, 8))
        x = torch.randn(4, 16)
        y = packed_matmul.matmul(x, w)
        assert "_foe_onednn" in w.__dict__
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
