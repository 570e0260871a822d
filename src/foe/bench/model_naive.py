"""The naive baseline of `foe bench model`: a sparse-MoE feed-forward written the way Hugging Face's
Mixtral block (`MixtralSparseMoeBlock.forward`) is, over the weights of one of our layers.

For each expert in turn it finds that expert's tokens with `torch.where` over a one-hot mask of the
chosen experts, indexes them out, applies the expert and `index_add_`s the weighted result back. It
shares its parameters with the `MoEFeedForward` it wraps (no copies), so a model whose feed-forwards
are swapped for it computes the same logits and expert counts; `tests/bench/test_model_bench.py`
checks that. It handles FoE's G routing domains the same way our router does (group g picks among
its own experts, ids are module-global), so it can stand in for both architectures.

What it does not do: the load-balancing and z losses. Like Hugging Face, which computes the balance
loss outside the block and only when training, it returns zeros for both, as our router does in eval
mode (the mode the benchmark runs in).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from foe.model.ffn import MoEFeedForward
from foe.model.precision import upcast
from foe.model.router import RouterOutput
from foe.model.transformer import Transformer


class NaiveSparseMoE(nn.Module):
    """Mixtral-style per-expert loop over the (shared) weights of `ffn`: x_GTD -> (y_GTD, RouterOutput)."""

    def __init__(self, ffn: MoEFeedForward) -> None:
        super().__init__()
        router, experts = ffn.router, ffn.experts
        if not hasattr(experts, "w13"):
            raise ValueError(f"the naive baseline needs local GroupedExperts, got {type(experts).__name__}")
        self.router_weight = router.weight  # [G, D, e], shared
        self.w13, self.w2 = experts.w13, experts.w2  # [E, D, 2F], [E, F, D], shared
        self.top_k, self.score, self.renorm = router.top_k, router.score, router.renorm

    def forward(self, x_GTD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        G, T, D = x_GTD.shape
        e, E = self.router_weight.shape[2], self.w13.shape[0]
        router_logits = upcast(torch.bmm(x_GTD, self.router_weight))  # Mixtral: softmax in float32 (or wider)
        routing = router_logits.softmax(-1) if self.score == "softmax" else router_logits.sigmoid()
        routing_weights, selected = routing.topk(self.top_k, dim=-1)
        if self.renorm:
            routing_weights = routing_weights / routing_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        selected = selected + torch.arange(G, device=x_GTD.device).view(G, 1, 1) * e  # global ids
        hidden = x_GTD.reshape(G * T, D)
        routing_weights = routing_weights.reshape(G * T, -1).to(hidden.dtype)
        final = torch.zeros_like(hidden)
        # [E, A, G*T]: expert_mask[j, a, t] is 1 when token t's a-th choice is expert j.
        expert_mask = F.one_hot(selected.reshape(G * T, -1), num_classes=E).permute(2, 1, 0)
        for j in range(E):
            idx, top_x = torch.where(expert_mask[j])
            current = hidden[None, top_x].reshape(-1, D)
            gate, up = (current @ self.w13[j]).chunk(2, dim=-1)
            out = (F.silu(gate) * up) @ self.w2[j] * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(hidden.dtype))
        counts = expert_mask.sum(dim=(1, 2))
        zero = router_logits.new_zeros(())
        return final.view(G, T, D), RouterOutput(routing_weights.view(G, T, -1), selected, counts, zero, zero)


@contextmanager
def naive_feed_forwards(model: Transformer) -> Iterator[Transformer]:
    """Within the block, every layer's feed-forward of `model` is the naive loop over the same weights."""
    originals = [layer.ffn for layer in model.layers]
    try:
        for layer, ffn in zip(model.layers, originals):
            layer.ffn = NaiveSparseMoE(ffn)
        yield model
    finally:
        for layer, ffn in zip(model.layers, originals):
            layer.ffn = ffn
