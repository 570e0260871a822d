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


def filtered_logprobs_batch(logits_NV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Log-probabilities after each row's temperature, top-k and top-p; excluded tokens get -inf.
    One batched pass (a sort only when some row asks for top-p)."""
    x = upcast(logits_NV) / torch.tensor([max(p.temperature, 1e-6) for p in params], dtype=upcast(logits_NV).dtype,
                                         device=logits_NV.device)[:, None]
    V = x.shape[-1]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(ks) < V:
        kth = torch.topk(x, max(k for k in ks if k < V), dim=-1).values  # best first
        k_idx = torch.tensor([k - 1 if k < V else 0 for k in ks], device=x.device)
        cut = kth.gather(1, k_idx[:, None])
        cut[torch.tensor([k == V for k in ks], device=x.device)] = float("-inf")
        x = x.masked_fill(x < cut, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=x.dtype, device=x.device)
    if (top_p < 1).any():
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the mass of the tokens ranked before it already reaches top_p
        drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x.log_softmax(-1)


def filtered_logprobs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row of `filtered_logprobs_batch`."""
    return filtered_logprobs_batch(logits_V[None], [p])[0]


def sample(logits_NV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row; row i uses params[i] and generators[i] (None: the global RNG).

    Sampled rows draw by inverting their cumulative distribution at one uniform number each: the
    filtering is batched, only one random number per row is generated (per-token noise, as in
    multinomial or the exponential race, costs ~16 ns a token on a CPU: 4 ms for 64 x 4096), and a seeded
    row's draw depends only on its own generator, so it is the same token whatever else is in the batch."""
    out = torch.argmax(logits_NV, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    cdf = filtered_logprobs_batch(logits_NV[rows], [params[i] for i in rows]).double().exp_().cumsum_(-1)
    u = torch.empty(len(rows), dtype=torch.float64)
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            u[j] = torch.rand(1, dtype=torch.float64, generator=generators[i])
    # The first token whose cumulative mass exceeds u: a filtered token (no mass) never is.
    # u stays below the total mass even after rounding, so some token with mass always exceeds it.
    total = cdf[:, -1:]
    u = torch.minimum(u.to(cdf.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    out[rows] = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return out


def make_generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def token_logprobs(logits_NV: torch.Tensor, token_ids_N: torch.Tensor, top_n: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw model log-probabilities (no temperature or filtering) of the given tokens, plus the top_n
    alternatives of each row: (chosen_N, top_logprobs_Nn, top_ids_Nn)."""
    lp = upcast(logits_NV).log_softmax(-1)
    chosen = lp.gather(1, token_ids_N.to(lp.device).view(-1, 1)).squeeze(1)  # ids may come from the host
    top = torch.topk(lp, top_n, dim=-1) if top_n > 0 else None
    empty = lp.new_zeros(lp.shape[0], 0)
    return chosen, (top.values if top else empty), (top.indices if top else empty.long())
