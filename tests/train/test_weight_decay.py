"""Which parameters AdamW decays: weight matrices yes; norm gains (1-D or per-group [G, D]) and biases never."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foe.config import ModelConfig
from foe.model import Transformer
from foe.train.optim import build_optimizer


def _expected(n_layers: int) -> tuple[list[str], list[str]]:
    decay, no_decay = ["embed.weight"], []
    for i in range(n_layers):
        p = f"layers.{i}."
        no_decay += [p + "attn_norm.weight", p + "ffn_norm.weight"]
        decay += [p + "attn.wqkv", p + "attn.wo", p + "ffn.router.weight", p + "ffn.experts.w13", p + "ffn.experts.w2"]
    return decay + ["head.weight"], no_decay + ["norm.weight"]


@pytest.mark.parametrize("arch", ["moe", "foe"])
def test_decay_lists_for_both_architectures(arch: str) -> None:
    cfg = ModelConfig.from_preset("tiny", arch=arch)
    model = Transformer(cfg)
    want_decay, want_no_decay = _expected(cfg.n_layers)
    # The per-group norm weights are 2-D (a rank rule would decay them): [G, D], with G = 1 for MoE.
    assert model.get_parameter("layers.0.attn_norm.weight").ndim == 2
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    by_id = {id(p): n for n, p in model.named_parameters()}
    got = {g["weight_decay"]: sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert got == {0.1: sorted(want_decay), 0.0: sorted(want_no_decay)}


@pytest.mark.parametrize("arch", ["moe", "foe"])
def test_decay_split_names(arch: str) -> None:
    from foe.train.optim import decay_split
    cfg = ModelConfig.from_preset("tiny", arch=arch)
    decay, no_decay = decay_split(Transformer(cfg))
    want_decay, want_no_decay = _expected(cfg.n_layers)
    assert sorted(decay) == sorted(want_decay)
    assert no_decay == want_no_decay


def test_decay_leaves_norm_gains_alone_in_a_real_step() -> None:
    """With zero gradients, AdamW's update is decay alone: gains must stay exactly at 1."""
    from foe.train.optim import decay_split
    model = Transformer(ModelConfig.from_preset("tiny", arch="foe"))
    opt = build_optimizer(model, lr=0.5, weight_decay=0.5, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    decay, no_decay = decay_split(model)
    for n in no_decay:
        assert torch.equal(model.get_parameter(n), before[n]), n
    for n in decay:
        assert not torch.equal(model.get_parameter(n), before[n]), n


def test_biases_and_foreign_norms_are_exempt_and_tied_weights_listed_once() -> None:
    from foe.train.optim import decay_split
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
    net[2].weight = net[0].weight  # tied
    decay, no_decay = decay_split(net)
    assert decay == ["0.weight"]
    assert no_decay == ["0.bias", "1.weight", "1.bias"]
