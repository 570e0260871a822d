"""Zero-shot multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it.

For each choice the request is (context, " " + choice). As in lm-eval's HF model: trailing spaces of
the context move to the continuation; the continuation's tokens are those of encode(context +
continuation) past len(encode(context)); an empty context becomes [EOS]; inputs longer than the model's
window keep their last max_len + 1 tokens. The log-likelihood is the sum of log p(token) over the
continuation. acc = argmax of the sums is gold; acc_norm = argmax of sum / len(choice in characters)
is gold (first index wins ties, as numpy's argmax). This module knows nothing of task formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from foe.eval.heldout import mean_stderr
from foe.eval.tasks import MCItem
from foe.model.precision import upcast
from foe.model.transformer import Transformer
from foe.tokenizer import eos_id

TARGET_DELIMITER = " "


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if not context:
        eos = eos_id(tok)
        if eos is None:
            raise ValueError("an empty context needs an <|endoftext|> token")
        return [eos], tok.encode(continuation, add_special_tokens=False).ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: Transformer, tok: Tokenizer, requests: list[tuple[str, str]], batch_size: int = 16
                   ) -> list[float]:
    """Sum of log-probabilities of each continuation given its context."""
    max_len = model.cfg.max_seq_len
    device = next(model.parameters()).device
    model.eval()
    prepared = []  # (tokens fed + the last target, number of continuation tokens)
    for ctx_text, cont_text in requests:
        ctx, cont = encode_pair(tok, ctx_text, cont_text)
        if not cont:
            raise ValueError(f"continuation {cont_text!r} encodes to no tokens")
        prepared.append(((ctx + cont)[-(max_len + 1):], len(cont)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))  # similar lengths per batch
    out = [0.0] * len(prepared)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = len(prepared[idx[0]][0]) - 1
        ids = torch.zeros(len(idx), width, dtype=torch.int64)
        mask = torch.zeros(len(idx), width, dtype=torch.bool)
        for r, i in enumerate(idx):
            seq = prepared[i][0]
            ids[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            mask[r, :len(seq) - 1] = True
        # Right padding: causal attention never lets a real token see it, and the experts skip it.
        logp = F.log_softmax(upcast(model(ids.to(device), token_mask_BL=mask.to(device)).logits), -1).cpu()
        for r, i in enumerate(idx):
            seq, n = prepared[i]
            # Logits at position t predict token t + 1: the continuation's n tokens are predicted by
            # positions len(seq) - 1 - n .. len(seq) - 2.
            rows = torch.arange(len(seq) - 1 - n, len(seq) - 1)
            out[i] = float(logp[r, rows, torch.tensor(seq[-n:])].sum())
    return out


def score_items(model: Transformer, tok: Tokenizer, items: list[MCItem], batch_size: int = 16
                ) -> dict[str, float]:
    """acc and acc_norm (lm-eval's definitions) over `items`, their standard errors (lm-eval's mean_stderr:
    sample standard deviation of the 0/1 scores over sqrt(n)), and the item count."""
    requests = [(it.context, TARGET_DELIMITER + c) for it in items for c in it.choices]
    lls = loglikelihoods(model, tok, requests, batch_size)
    acc: list[float] = []
    acc_norm: list[float] = []
    k = 0
    for it in items:
        ll = lls[k:k + len(it.choices)]
        k += len(it.choices)
        norm = [v / len(c) for v, c in zip(ll, it.choices)]
        acc.append(float(max(range(len(ll)), key=lambda j: (ll[j], -j)) == it.gold))
        acc_norm.append(float(max(range(len(norm)), key=lambda j: (norm[j], -j)) == it.gold))
    return {"acc": sum(acc) / len(items), "acc_stderr": mean_stderr(acc), "acc_norm": sum(acc_norm) / len(items),
            "acc_norm_stderr": mean_stderr(acc_norm), "n": len(items)}
