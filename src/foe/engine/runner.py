"""ModelRunner: turns one shard's rows of a step plan into one packed token stream, runs the forward
pass over the paged KV cache, and returns the logits of the positions that asked for them. One per rank.

The batch is flat, as in vLLM v1: every row's tokens one after another ([1, T]), each with its
absolute position and pool slot (`paged_attention.PackedStep`), so there is no padding, no token mask
and one forward per step whatever the mix of prompt chunks and decodes. Knows nothing of scheduling,
sampling or processes.
"""

from __future__ import annotations

import torch

from foe.engine import kernels
from foe.engine.kv_cache import KVPool
from foe.engine.paged_attention import PackedStep, PagedKVCache
from foe.engine.request import RowPlan, StepPlan
from foe.model.precision import upcast
from foe.model.transformer import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, paged_kernel: bool | None = None
                 ) -> None:
        """paged_kernel: decode attention by the native kernel (True; CPU only), by gather + SDPA (False), or
        the kernel where it runs (None: on the CPU when it can be built, here, once, so no request waits for
        the compiler; the torch path on CUDA). The pool, and so every step, lives on the model's device."""
        self.model = model
        self.pool = KVPool.for_model(model, num_blocks, block_size)
        device = self.pool.k.device
        if paged_kernel is None:
            paged_kernel = kernels.decode_kernel_available(device)
        elif paged_kernel and not kernels.decode_kernel_available(device):
            raise ValueError(f"the native paged-attention kernel runs on the CPU only (and only where it could be "
                             f"built); this model is on {device}: use paged_kernel=None or False")
        self.paged_kernel = paged_kernel

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def prepare(self, rows: list[RowPlan]) -> PackedStep:
        return PackedStep.build(rows, self.pool.block_size, self.pool.scratch_block)

    @torch.inference_mode()
    def execute(self, rows: list[RowPlan]) -> torch.Tensor:
        """Run one forward over `rows` (may be empty: ranks of an expert-parallel model must still take
        part in every layer's collectives). Returns logits [N, V] in at least float32 (float64 for a float64
        model), N = sum of rows' num_logits, in row order."""
        step = self.prepare(rows).to(self.pool.k.device)
        out = self.model(step.input_ids, pos_BL=step.pos, cache=PagedKVCache(self.pool, step, self.paged_kernel),
                         logits_at=step.logits_at)
        logits = upcast(out.logits)
        return logits if step.restore is None else logits[step.restore]

    def execute_plan(self, plan: StepPlan, dp_rank: int = 0) -> torch.Tensor:
        """This rank's part of a step: logits of shard `dp_rank`'s rows, in row order."""
        return self.execute(plan.shards[dp_rank])
