"""Scoring a model on held-out windows: loss with its standard error, and the experts' load.

Tokens of one window are not independent (they share a document and a context), so the standard error
is taken over windows: every window has the same number of tokens, the loss is the mean of per-window
mean losses, and its standard error is the sample standard deviation of those over sqrt(windows). This
is the unit a bootstrap over windows would resample; treating tokens as independent would understate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from foe.model.transformer import Transformer
from foe.train.trainer import forward_losses

Z95 = 1.959964  # two-sided 95% normal quantile


def mean_stderr(values: list[float] | torch.Tensor) -> float:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), as lm-eval's mean_stderr."""
    x = torch.as_tensor(values, dtype=torch.float64)
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@dataclass
class HeldOutScore:
    window_losses: torch.Tensor  # [W] float64: mean cross-entropy (nats/token) of each window
    expert_counts: torch.Tensor  # [n_layers, E] tokens routed to each expert over all windows
    tokens: int

    @property
    def loss(self) -> float:
        return float(self.window_losses.mean())

    @property
    def stderr(self) -> float:
        return mean_stderr(self.window_losses)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.loss - Z95 * self.stderr, self.loss + Z95 * self.stderr
        return {"val_loss": self.loss, "val_loss_stderr": self.stderr, "val_ppl": math.exp(self.loss),
                "val_ppl_ci95": [math.exp(lo), math.exp(hi)], "val_tokens": self.tokens,
                "val_windows": len(self.window_losses)}


def score_windows(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], bf16: bool = False
                  ) -> HeldOutScore:
    """Per-window losses and the expert load of `model` over (inputs_BL, targets_BL) batches."""
    if not batches:
        raise ValueError("no held-out windows to score: the held-out text is shorter than one window")
    losses, counts, tokens = [], None, 0
    for ce, out in forward_losses(model, batches, bf16):
        losses.append(ce.double().mean(1).cpu())
        c = out.expert_counts.detach().double().cpu()
        counts = c if counts is None else counts + c
        tokens += ce.numel()
    return HeldOutScore(torch.cat(losses), counts, tokens)
