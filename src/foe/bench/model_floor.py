"""The latency floor of a forward pass on this machine: the work a forward must do (FLOPs, bytes of
weights and KV cache touched), and the machine's measured matmul rate and memory bandwidth.

    floor = max(flops / matmul_rate, bytes_touched / copy_bandwidth)

A forward can be no faster than its matrix products at the rate of a large matmul in its dtype, nor than
reading the weights it touches once at the rate of a large copy. The floor ignores everything else
(norms, routing, softmax, Python), so "fraction of the floor" measures all of that overhead together.
This module knows nothing about timing models; `model_latency.py` does that.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from foe.config import ModelConfig


@dataclass(frozen=True)
class MachineRates:
    matmul_gflops: float  # square matmul in the model's dtype (fp32 by default), median over repeats
    copy_gbps: float  # large tensor copy, bytes read + bytes written per second, median
    threads: int
    matmul_size: int
    copy_mib: int


@dataclass(frozen=True)
class ForwardWork:
    flops: float
    weight_bytes: float  # parameters read: all dense weights, the experts that received tokens, head rows
    kv_bytes: float  # KV cache written (new tokens) and read (context) by attention

    def floor_s(self, rates: MachineRates) -> float:
        return max(self.flops / (rates.matmul_gflops * 1e9),
                   (self.weight_bytes + self.kv_bytes) / (rates.copy_gbps * 1e9))


def _median_seconds(fn: Callable[[], object], repeats: int, clock: Callable[[], float], warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def measure_machine(repeats: int = 5, matmul_size: int = 2048, copy_mib: int = 256,
                    clock: Callable[[], float] = time.perf_counter, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> MachineRates:
    """Measure the matmul GFLOP/s in `dtype` and copy GB/s now on `device` (the CPU with torch's current
    thread count, or a GPU's memory). `clock` is the timer (`time.thread_time` gives CPU time, which a busy
    machine inflates less, for 1 thread); on CUDA it must synchronise (`foe.device.synced_clock`)."""
    if repeats < 1 or matmul_size < 1 or copy_mib < 1:
        raise ValueError("repeats, matmul_size and copy_mib must be positive")
    n = matmul_size
    a, b, c = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(3))
    mm_s = _median_seconds(lambda: torch.mm(a, b, out=c), repeats, clock)
    src = torch.randn(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), repeats, clock)
    return MachineRates(matmul_gflops=2 * n**3 / mm_s / 1e9, copy_gbps=2 * src.numel() * 4 / copy_s / 1e9,
                        threads=torch.get_num_threads(), matmul_size=n, copy_mib=copy_mib)


def forward_work(cfg: ModelConfig, batch: int, new_tokens: int, context: int, experts_hit: int,
                 logit_rows: int, dtype_bytes: int = 4) -> ForwardWork:
    """Work of one forward over `batch` sequences of `new_tokens` tokens after `context` cached ones.

    experts_hit: experts (summed over layers) that received at least one token, i.e. whose weights
    were read. logit_rows: rows that get logits (one per sequence when serving). Attention is causal:
    new token i attends to context + i + 1 keys, so the mean key count is context + (new_tokens + 1) / 2.
    """
    if min(batch, new_tokens, logit_rows) < 1 or context < 0 or experts_hit < 0:
        raise ValueError("batch, new_tokens and logit_rows must be >= 1; context and experts_hit >= 0")
    if experts_hit > cfg.n_layers * cfg.n_experts:
        raise ValueError(f"experts_hit {experts_hit} exceeds n_layers * n_experts")
    head = 2 * cfg.vocab_size * cfg.d_model
    mean_keys = context + (new_tokens + 1) / 2
    tokens = batch * new_tokens
    flops = tokens * (cfg.flops_per_token(mean_keys) - head) + logit_rows * head
    expert_params = 3 * cfg.d_model * cfg.expert_hidden
    per_layer_dense = (cfg._attn_params() + cfg._norm_params_per_layer() + cfg.n_experts * cfg.d_model)
    params = (cfg.n_layers * per_layer_dense + experts_hit * expert_params
              + cfg.vocab_size * cfg.d_model + cfg.d_model  # LM head + final norm
              + min(tokens, cfg.vocab_size) * cfg.d_model)  # embedding rows looked up
    kv = cfg.kv_bytes_per_token(dtype_bytes) * batch * (context + new_tokens)
    return ForwardWork(flops=float(flops), weight_bytes=float(params * dtype_bytes), kv_bytes=float(kv))


def ffn_work(cfg: ModelConfig, tokens: int, experts_hit: int, dtype_bytes: int = 4) -> ForwardWork:
    """Work of one MoE/FoE feed-forward layer over `tokens` tokens: the router and top_k experts per
    token (FoE's G groups route the same token G times to top_k/G experts each: the same total), and
    the router plus the `experts_hit` experts' weights read once."""
    if tokens < 1 or not 0 <= experts_hit <= cfg.n_experts:
        raise ValueError("tokens must be >= 1 and 0 <= experts_hit <= n_experts")
    expert_params = 3 * cfg.d_model * cfg.expert_hidden
    router = cfg.n_experts * cfg.d_model
    flops = 2 * tokens * (router + cfg.top_k * expert_params)
    return ForwardWork(flops=float(flops), weight_bytes=float((router + experts_hit * expert_params) * dtype_bytes),
                       kv_bytes=0.0)
