"""Sampling next tokens from logits: greedy, temperature, top-k, top-p, per-row seeded generators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foe.model.precision import upcast


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logprobs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Log-probabilities after temperature, top-k and top-p; excluded tokens get -inf."""
    x = upcast(logits_V) / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the mass of the tokens ranked before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x.log_softmax(-1)


def sample(logits_NV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row; row i uses params[i] and generators[i] (None: the global RNG)."""
    out = torch.empty(logits_NV.shape[0], dtype=torch.long)
    greedy = torch.argmax(logits_NV, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            out[i] = greedy[i]
        else:
            probs = filtered_logprobs(logits_NV[i], p).exp()
            out[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    return out


def make_generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def token_logprobs(logits_NV: torch.Tensor, token_ids_N: torch.Tensor, top_n: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw model log-probabilities (no temperature or filtering) of the given tokens, plus the top_n
    alternatives of each row: (chosen_N, top_logprobs_Nn, top_ids_Nn)."""
    lp = upcast(logits_NV).log_softmax(-1)
    chosen = lp.gather(1, token_ids_N.view(-1, 1)).squeeze(1)
    top = torch.topk(lp, top_n, dim=-1) if top_n > 0 else None
    empty = lp.new_zeros(lp.shape[0], 0)
    return chosen, (top.values if top else empty), (top.indices if top else empty.long())
