"""An independent float64 forward pass of MoE and FoE, written from the definitions over a model's state
dict: one sequence, one token and one head at a time, with its own rotary angles, RMSNorm, causal
softmax attention, top-k routing and SwiGLU experts. It shares no code with `foe.model`, so a precision
slip there (a float32 table, a `.float()`) shows up as a difference from it."""

from __future__ import annotations

import math

import torch

from foe.config import ModelConfig

Weights = dict[str, torch.Tensor]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def _rotate(v: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Half-split rotary: pair (v[i], v[i + K/2]) turned by pos * theta^(-2i/K)."""
    half = v.shape[0] // 2
    out = v.clone()
    for i in range(half):
        a = pos * theta ** (-2 * i / v.shape[0])
        c, s = math.cos(a), math.sin(a)
        out[i] = v[i] * c - v[i + half] * s
        out[i + half] = v[i] * s + v[i + half] * c
    return out


def _attention(cfg: ModelConfig, w: Weights, pre: str, g: int, x_LD: torch.Tensor) -> torch.Tensor:
    """Group g's causal attention over its input rows (already the group's stream), before any sum."""
    G = cfg.num_groups
    Q, H, K = cfg.n_heads // G, cfg.n_kv_heads // G, cfg.head_dim
    xn = [_rms(x, w[f"{pre}attn_norm.weight"][g], cfg.norm_eps) for x in x_LD]
    qkv = [x @ w[f"{pre}attn.wqkv"][g] for x in xn]
    q = [[_rotate(r[h * K:(h + 1) * K], p, cfg.rope_theta) for h in range(Q)] for p, r in enumerate(qkv)]
    k = [[_rotate(r[(Q + h) * K:(Q + h + 1) * K], p, cfg.rope_theta) for h in range(H)] for p, r in enumerate(qkv)]
    v = [[r[(Q + H + h) * K:(Q + H + h + 1) * K] for h in range(H)] for r in qkv]
    out = []
    for t in range(len(x_LD)):
        heads = []
        for h in range(Q):
            kv = h // (Q // H)
            scores = torch.stack([q[t][h] @ k[s][kv] for s in range(t + 1)]) / math.sqrt(K)
            p = torch.exp(scores - scores.max())
            heads.append(sum(p[s] / p.sum() * v[s][kv] for s in range(t + 1)))
        out.append(torch.cat(heads) @ w[f"{pre}attn.wo"][g])
    return torch.stack(out)


def _moe(cfg: ModelConfig, w: Weights, pre: str, g: int, x_LD: torch.Tensor) -> torch.Tensor:
    """Group g's feed-forward: route each row among the group's experts, weighted sum of SwiGLU outputs."""
    e, A, F = cfg.experts_per_group, cfg.top_k_per_group, cfg.expert_hidden
    out = []
    for x in x_LD:
        xn = _rms(x, w[f"{pre}ffn_norm.weight"][g], cfg.norm_eps)
        logits = xn @ w[f"{pre}ffn.router.weight"][g]
        probs = torch.softmax(logits, 0) if cfg.router_score == "softmax" else torch.sigmoid(logits)
        gates, chosen = probs.topk(A)
        if cfg.router_renorm:
            gates = gates / gates.sum()
        y = torch.zeros_like(x)
        for gate, j in zip(gates, chosen.tolist()):
            w13, w2 = w[f"{pre}ffn.experts.w13"][g * e + j], w[f"{pre}ffn.experts.w2"][g * e + j]
            h = xn @ w13
            y = y + gate * ((torch.nn.functional.silu(h[:F]) * h[F:]) @ w2)
        out.append(y)
    return torch.stack(out)


def _layer(cfg: ModelConfig, w: Weights, i: int, s: torch.Tensor, p: list[torch.Tensor] | None
           ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One layer's dataflow (model/moe.py and model/foe.py docstrings); p: FoE's private streams."""
    pre, groups = f"layers.{i}.", range(cfg.num_groups)
    if cfg.arch == "foe" and cfg.sync == "attention":
        a = [_attention(cfg, w, pre, g, s if p is None else s + p[g]) for g in groups]
        s = s + sum(a[g] if p is None else a[g] + p[g] for g in groups)
        return s, [_moe(cfg, w, pre, g, s) for g in groups]
    if cfg.arch == "foe" and cfg.sync == "moe":
        a = [_attention(cfg, w, pre, g, s) for g in groups]
        return s + sum(a[g] + _moe(cfg, w, pre, g, s + a[g]) for g in groups), None
    h = s + sum(_attention(cfg, w, pre, g, s) for g in groups)
    return h + sum(_moe(cfg, w, pre, g, h) for g in groups), None


def reference_logits(cfg: ModelConfig, state: Weights, ids_L: list[int]) -> torch.Tensor:
    """[L, V] logits of one sequence, computed in float64 from `state` (a model's state_dict)."""
    w = {k: v.detach().to(torch.float64) for k, v in state.items()}
    s, p = w["embed.weight"][ids_L], None
    for i in range(cfg.n_layers):
        s, p = _layer(cfg, w, i, s, p)
    if p is not None:
        s = s + sum(p)
    head = w["embed.weight"] if cfg.tie_embeddings else w["head.weight"]
    return torch.stack([_rms(x, w["norm.weight"], cfg.norm_eps) @ head.T for x in s])
