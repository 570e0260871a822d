"""AdamW with decoupled weight decay on weight matrices only, and a warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so the "scheduler state" to checkpoint is the step alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from foe.model.layers import GroupRMSNorm, RMSNorm

# Modules whose parameters are gains or shifts of a normalisation: decaying them pulls the scale towards 0,
# which is a regulariser nobody asked for. Their rank says nothing (GroupRMSNorm's weight is [G, D]).
NORM_MODULES: tuple[type[nn.Module], ...] = (GroupRMSNorm, RMSNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def no_decay_reason(module: nn.Module, param_name: str) -> str | None:
    """Why a parameter (named `param_name` inside `module`) gets no weight decay, or None if it does.

    The rule: decay the weight matrices (projections, experts, routers, embeddings, the head); never the
    parameters of a normalisation module (gains, scales, shifts), nor any bias, whatever its shape."""
    if isinstance(module, NORM_MODULES):
        return "normalisation gain/scale"
    if param_name == "bias" or param_name.endswith("_bias"):
        return "bias"
    return None


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of parameters that decay, names that do not), in `model.named_parameters()` order."""
    exempt = {id(p) for mod in model.modules() for p_name, p in mod.named_parameters(recurse=False)
              if no_decay_reason(mod, p_name)}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied weight once
    decay = [n for n, p in trainable if id(p) not in exempt]
    no_decay = [n for n, p in trainable if id(p) in exempt]
    return decay, no_decay


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters `decay_split` names, none on the others."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    # foreach=False: the per-tensor loop gives bit-identical results however parameters are grouped,
    # which the exact-resume and data-parallel tests rely on; the speed cost is small at these sizes.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from peak/warmup to peak over `warmup` steps, then cosine decay to min_ratio*peak at
    `total` steps (held there after). `step` counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
