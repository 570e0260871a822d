"""Generation with the bare model and a dense KV cache (no engine): the reference the engine is
tested against, and the simplest way to try a checkpoint."""

from __future__ import annotations

import torch

from foe.engine.sampler import SamplingParams, make_generator, sample
from foe.model.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
             params: SamplingParams = SamplingParams(temperature=0.0),
             stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Continue each prompt (token ids) by up to `max_new_tokens`; returns the new tokens only.

    Prompts of different lengths are right-padded into one batch; each row decodes at its own positions.
    Runs on the model's device (the KV cache follows it).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, lens = len(prompts), [len(p) for p in prompts]
    total = max(lens) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len {model.cfg.max_seq_len}")
    device = model.embed.weight.device  # inputs are built on the host and moved once
    ids = torch.zeros(B, max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
    cache = model.new_cache(B, total)
    last = torch.tensor(lens) - 1
    rows = torch.arange(B, device=device)
    out = model(ids.to(device), cache=cache, token_mask_BL=mask.to(device),
                logits_at=(torch.arange(B) * max(lens) + last).to(device))
    gens = [make_generator(None if params.seed is None else params.seed + i) for i in range(B)]
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pos = torch.tensor(lens, device=device)
    for step in range(max_new_tokens):
        tok = sample(out.logits, [params] * B, gens)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = t in stop_token_ids
        if all(done) or step == max_new_tokens - 1:
            break
        out = model(tok[:, None], pos_BL=pos[:, None], cache=cache, logits_at=rows)
        pos = pos + 1
    return new
