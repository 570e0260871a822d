"""Model configuration: one frozen dataclass for MoE and FoE, with named presets.

The config knows its own size (parameters, active parameters, FLOPs, KV-cache bytes) so that tests
and the cost model can compare architectures without building them. It knows nothing of how a
model is distributed; that lives in `foe.parallel`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["moe", "foe"]
Sync = Literal["attention", "moe", "both"]

ARCHS = ("moe", "foe")
SYNCS = ("attention", "moe", "both")
ROUTER_SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a MoE or FoE decoder-only transformer.

    FoE splits every layer into `num_groups = n_kv_heads` groups; group g owns KV head g, the
    `n_heads / n_kv_heads` query heads sharing it, `n_experts / G` experts and a router choosing
    `top_k / G` of them. With `arch="moe"` there is a single routing domain over all experts.
    """

    arch: Arch = "moe"
    vocab_size: int = 320
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    router_score: str = "softmax"  # softmax | sigmoid
    router_renorm: bool = True  # renormalise gate weights over the chosen experts
    sync: Sync = "attention"  # FoE only: where the cross-group sum sits (see model/foe.py)
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid ModelConfig: {msg}")

        _check_field_types(self)
        need(self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}")
        need(self.sync in SYNCS, f"sync must be one of {SYNCS}, got {self.sync!r}")
        need(self.router_score in ROUTER_SCORES,
             f"router_score must be one of {ROUTER_SCORES}, got {self.router_score!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "n_experts", "top_k", "expert_hidden", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        need(self.top_k <= self.n_experts,
             f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        if self.arch == "foe":
            g = self.n_kv_heads
            need(self.n_experts % g == 0,
                 f"FoE needs n_experts ({self.n_experts}) divisible by the number of groups "
                 f"(n_kv_heads = {g})")
            need(self.top_k % g == 0,
                 f"FoE needs top_k ({self.top_k}) divisible by the number of groups "
                 f"(n_kv_heads = {g}): each group picks top_k / G experts")
        need(self.norm_eps > 0 and self.rope_theta > 0, "norm_eps and rope_theta must be positive")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """G: routing domains per layer (n_kv_heads for FoE, 1 for MoE)."""
        return self.n_kv_heads if self.arch == "foe" else 1

    @property
    def experts_per_group(self) -> int:
        return self.n_experts // self.num_groups

    @property
    def top_k_per_group(self) -> int:
        return self.top_k // self.num_groups

    # ---- size accounting ------------------------------------------------------------------------
    def _attn_params(self) -> int:
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return self.d_model * (q + 2 * kv) + q * self.d_model

    def _norm_params_per_layer(self) -> int:
        return 2 * self.num_groups * self.d_model

    def _embed_params(self) -> int:
        n = self.vocab_size * self.d_model
        return n if self.tie_embeddings else 2 * n

    @property
    def num_params(self) -> int:
        per_layer = (self._attn_params() + self._norm_params_per_layer()
                     + self.n_experts * self.d_model  # routers
                     + self.n_experts * 3 * self.d_model * self.expert_hidden)
        return self.n_layers * per_layer + self._embed_params() + self.d_model

    @property
    def num_active_params(self) -> int:
        """Parameters touched per token (top_k experts; the embedding row is a lookup, not counted)."""
        per_layer = (self._attn_params() + self._norm_params_per_layer()
                     + self.n_experts * self.d_model
                     + self.top_k * 3 * self.d_model * self.expert_hidden)
        return self.n_layers * per_layer + self.vocab_size * self.d_model + self.d_model

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs per token: 2 per active matmul weight plus attention over `context_len` keys."""
        matmul = (self._attn_params() + self.n_experts * self.d_model
                  + self.top_k * 3 * self.d_model * self.expert_hidden)
        attn = 4 * self.n_heads * self.head_dim * context_len  # QK^T and PV
        return float(self.n_layers * (2 * matmul + attn) + 2 * self.vocab_size * self.d_model)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    # ---- (de)serialisation ----------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - _HF_KEYS)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`from_preset("small", arch="foe")` or `from_preset("foe-small")`."""
        arch = None
        for prefix in ARCHS:
            if name.startswith(prefix + "-"):
                arch, name = prefix, name[len(prefix) + 1:]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        if arch is not None:
            base["arch"] = arch
        base.update(overrides)
        return cls(**base)


def _check_field_types(cfg: ModelConfig) -> None:
    """Every field against its annotation, so that a hand-edited config.json fails with a message naming
    the field rather than deep inside the model. bool is a subclass of int in Python, so `true` would pass
    as 1 without the explicit exclusion; a float field accepts an int (JSON writes 10000.0 as 10000 in some
    tools) and stores it as a float, so that equal configs serialise alike."""
    for f in dataclasses.fields(cfg):
        value, expected = getattr(cfg, f.name), _FIELD_TYPES[f.name]
        if typing.get_origin(expected) is Literal:
            ok, want = isinstance(value, str) and value in typing.get_args(expected), \
                f"one of {typing.get_args(expected)}"
        elif expected is bool:
            ok, want = isinstance(value, bool), "a bool (true/false)"
        elif expected is int:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an int"
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite float"
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        else:
            ok, want = isinstance(value, expected), f"a {expected.__name__}"
        if not ok:
            raise ValueError(f"invalid ModelConfig: {f.name} must be {want}, got {value!r} "
                             f"({type(value).__name__})")


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(ModelConfig)

# Keys that a Hugging Face-style config.json may carry beside ours; ignored on load.
_HF_KEYS = {"model_type", "architectures", "auto_map", "torch_dtype", "transformers_version",
            "foe_version", "bos_token_id", "eos_token_id", "pad_token_id"}

# Sizes only; `arch` is chosen separately so that a MoE and an FoE preset are the same model size.
PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: builds and runs a forward pass in milliseconds.
    "tiny": dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 n_experts=8, top_k=2, expert_hidden=64, max_seq_len=256),
    # Quality comparisons on a 2-core CPU in minutes (`foe compare-quality`): ~4.4M parameters, ~1.5M active.
    "mini": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=16,
                 n_experts=16, top_k=4, expert_hidden=128, max_seq_len=512),
    # Trains and serves on a 2-core CPU: ~9.2M parameters, ~3.4M active.
    "small": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                  n_experts=16, top_k=4, expert_hidden=128, max_seq_len=1024),
    # Paper-scale guesses (the paper's exact configs are unpublished). n_kv_heads = 8: one FoE group
    # per GPU of an 8-GPU node. 1b: ~0.96B total, ~0.30B active; 7b: OLMoE-like, ~6.85B total, ~1.11B active.
    "1b": dict(vocab_size=50304, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=64,
               n_experts=32, top_k=8, expert_hidden=512, max_seq_len=16384, rope_theta=500000.0),
    "7b": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128,
               n_experts=64, top_k=8, expert_hidden=1024, max_seq_len=16384, rope_theta=500000.0),
}
