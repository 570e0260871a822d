"""FoE reduces to MoE with one group; MoE and FoE differ in size only by per-group norms."""

from __future__ import annotations

import pytest
import torch

from foe.config import PRESETS, ModelConfig
from tests.conftest import build, tiny


@pytest.mark.parametrize("sync", ["attention", "moe", "both"])
def test_foe_with_one_group_equals_moe(sync: str) -> None:
    moe = build(tiny("moe", n_kv_heads=1, top_k=2))
    foe = build(tiny("foe", n_kv_heads=1, top_k=2, sync=sync), seed=1)
    foe.load_state_dict(moe.state_dict())
    x = torch.randint(0, 256, (3, 17))
    a, b = moe.train()(x), foe.train()(x)  # train mode: the routers' losses are computed
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert a.aux_loss > 0 and a.z_loss > 0
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    torch.testing.assert_close(b.z_loss, a.z_loss)
    assert torch.equal(b.expert_counts, a.expert_counts)


@pytest.mark.parametrize("sync", ["attention", "moe", "both"])
def test_foe_with_groups_is_a_different_function(sync: str) -> None:
    """The H=1 test above would pass trivially if FoE ignored its groups; with H=2 it must not match."""
    moe = build(tiny("moe"))
    foe = build(tiny("foe", sync=sync), seed=1)
    # Copy what has the same shape (attention, experts, embeddings); norms/routers differ by grouping.
    state = {k: v for k, v in moe.state_dict().items() if foe.state_dict()[k].shape == v.shape}
    foe.load_state_dict(state, strict=False)
    x = torch.randint(0, 256, (2, 9))
    assert (foe(x).logits - moe(x).logits).abs().max() > 1e-3


def test_sync_modes_differ() -> None:
    x = torch.randint(0, 256, (2, 9))
    outs = [build(tiny("foe", sync=s))(x).logits for s in ("attention", "moe", "both")]
    assert (outs[0] - outs[1]).abs().max() > 1e-4 and (outs[1] - outs[2]).abs().max() > 1e-4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_counts_differ_only_by_group_norms(preset: str) -> None:
    moe = ModelConfig.from_preset(preset, arch="moe")
    foe = ModelConfig.from_preset(preset, arch="foe")
    extra = 2 * (foe.num_groups - 1) * foe.d_model * foe.n_layers
    assert foe.num_params - moe.num_params == extra
    assert foe.num_active_params - moe.num_active_params == extra
    if preset in ("tiny", "small"):  # the real modules agree with the config's arithmetic
        for cfg in (moe, foe):
            assert build(cfg).num_params() == cfg.num_params


def test_paper_presets_are_plausible() -> None:
    for name, lo, hi in (("1b", 0.8e9, 1.3e9), ("7b", 6e9, 8e9)):
        cfg = ModelConfig.from_preset(name, arch="foe")
        assert lo < cfg.num_params < hi and cfg.n_kv_heads == 8
