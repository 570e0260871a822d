"""Top-k router over G independent routing domains (FoE groups; MoE has one).

Group g's router scores only group g's e = E/G experts and picks A = top_k/G of them, so tokens never
cross groups. Expert ids returned are module-global: g * e + local id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from foe.model.precision import upcast


@dataclass
class RouterOutput:
    weights_GTA: torch.Tensor  # gate weight of each chosen expert (at least float32: `compute_dtype`)
    experts_GTA: torch.Tensor  # module-global expert id, int64
    counts_E: torch.Tensor  # tokens routed to each expert of this module, int64
    aux_loss: torch.Tensor  # Switch load-balancing loss, mean over routing domains (0 in eval mode)
    z_loss: torch.Tensor  # router z-loss, mean squared logsumexp of the logits (0 in eval mode)


class TopKRouter(nn.Module):
    def __init__(self, num_groups: int, d_model: int, experts_per_group: int, top_k_per_group: int,
                 score: str, renorm: bool, init_std: float) -> None:
        super().__init__()
        self.top_k = top_k_per_group
        self.score, self.renorm = score, renorm
        self.weight = nn.Parameter(torch.randn(num_groups, d_model, experts_per_group) * init_std)

    def forward(self, x_GTD: torch.Tensor) -> RouterOutput:
        G, T, _ = x_GTD.shape
        e, A = self.weight.shape[2], self.top_k
        # Scores are computed as [G, e, T] (W^T x^T), and softmax/top-k reduce over dim 1: with few
        # experts per group (FoE) a [G, T, e] product and last-dim reductions over e are 5-20x slower
        # on CPU (tiny inner dimension); with many (MoE) both layouts cost the same.
        # softmax, top-k and gate weights in at least float32
        logits_GeT = upcast(torch.bmm(self.weight.transpose(1, 2).to(x_GTD.dtype), x_GTD.transpose(1, 2)))
        probs_GeT = logits_GeT.softmax(1) if self.score == "softmax" else logits_GeT.sigmoid()
        # top-1 (FoE's usual top_k / G) as max: the same choice, ~5x faster than topk on CPU.
        weights_GAT, local_GAT = probs_GeT.max(1, keepdim=True) if A == 1 else probs_GeT.topk(A, dim=1)
        if self.renorm:
            weights_GAT = weights_GAT / weights_GAT.sum(1, keepdim=True).clamp_min(1e-20)
        counts_Ge = torch.zeros(G, e, dtype=torch.int64, device=x_GTD.device)
        counts_Ge.scatter_add_(1, local_GAT.reshape(G, -1), torch.ones_like(local_GAT.reshape(G, -1)))
        aux = z = logits_GeT.new_zeros(())
        if self.training and T:  # training-only losses: inference skips their ~20 ops per layer
            # Switch Transformer balance loss per domain: e * sum_j f_j * P_j, f = share of routed slots,
            # P = mean routing probability (normalised to a distribution for sigmoid scores).
            dist = probs_GeT if self.score == "softmax" else probs_GeT / probs_GeT.sum(1, keepdim=True).clamp_min(1e-20)
            frac = counts_Ge.to(dist.dtype) / (T * A)
            aux = (e * (frac * dist.mean(2)).sum(-1)).mean()
            z = torch.logsumexp(logits_GeT, 1).pow(2).mean()
        offset = torch.arange(G, device=x_GTD.device).view(G, 1, 1) * e
        experts_GTA = (local_GAT + offset).transpose(1, 2).contiguous()
        return RouterOutput(weights_GAT.transpose(1, 2).contiguous(), experts_GTA, counts_Ge.view(-1), aux, z)
