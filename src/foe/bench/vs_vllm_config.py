"""Settings of `foe bench vs-vllm` and their checks; light (no torch, no HTTP) so the CLI and tests import it cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ENGINES = ("vllm", "foe")
SCENARIOS = ("saturation", "rate", "single")


@dataclass(frozen=True)
class VsVllmConfig:
    out_dir: str = "runs/bench-vs-vllm"
    checkpoint: str | None = None  # None: a `preset` checkpoint created (once) under out_dir
    preset: str = "small"
    arch: str = "moe"
    seed: int = 0
    dtype: str = "float32"
    vllm_python: str | None = None  # None: this interpreter
    scenarios: tuple[str, ...] = SCENARIOS
    num_prompts: int = 64  # saturation and rate
    single_prompts: int = 8  # one at a time
    request_rate: float = 4.0
    input_len: int = 256
    output_len: int = 64
    repeats: int = 2
    warmup: int = 2
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    foe_threads: int | None = None  # None: foe serve's own choice (OMP_NUM_THREADS unset)
    serve_args: tuple[str, ...] = field(default_factory=tuple)  # extra `foe serve` arguments
    vllm_args: tuple[str, ...] = field(default_factory=tuple)  # extra vLLM server arguments
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        bad = sorted(set(self.scenarios) - set(SCENARIOS))
        if not self.scenarios or bad:
            raise ValueError(f"scenarios must be among {list(SCENARIOS)}; got {list(self.scenarios)}"
                             + (f" ({', '.join(bad)} unknown)" if bad else ""))
        for name in ("num_prompts", "single_prompts", "input_len", "output_len", "repeats", "max_num_seqs",
                     "max_num_batched_tokens", "foe_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not (self.request_rate > 0 and math.isfinite(self.request_rate)):
            raise ValueError(f"--request-rate must be a positive number, got {self.request_rate}")
        if self.kv_cache_gib < 1:
            raise ValueError(f"--kv-cache-gib must be a whole number >= 1, got {self.kv_cache_gib}")
        if self.arch not in ("moe", "foe"):
            raise ValueError(f"--arch must be moe or foe, got {self.arch!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16 (one both servers take), got {self.dtype!r}")

    def scenario(self, name: str) -> dict[str, Any]:
        """Arrival rate, concurrency cap and request count of one scenario."""
        return {"saturation": dict(request_rate=math.inf, max_concurrency=None, n=self.num_prompts),
                "rate": dict(request_rate=self.request_rate, max_concurrency=None, n=self.num_prompts),
                "single": dict(request_rate=math.inf, max_concurrency=1, n=self.single_prompts)}[name]


def run_order(repeats: int) -> list[tuple[int, str]]:
    """(repeat, engine) in run order: vLLM first in even repeats, foe first in odd ones."""
    return [(r, e) for r in range(repeats) for e in (ENGINES if r % 2 == 0 else ENGINES[::-1])]
