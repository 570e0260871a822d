"""ModelRunner: turns one shard's rows of a step plan into batch tensors, runs the forward pass over the
paged KV cache, and returns the logits of the positions that asked for them. One per rank.

The batch is a right-padded [B, L] tensor: pos_BL gives every token its absolute position,
token_mask_BL marks padding so the experts skip it, padding writes its K/V to the pool's scratch slot,
and `logits_at` keeps the LM head to the rows that need logits. Knows nothing of scheduling, sampling
or processes.
"""

from __future__ import annotations

import torch

from foe.engine.kv_cache import KVPool, PagedKVCache
from foe.engine.request import RowPlan, StepPlan
from foe.model.precision import upcast
from foe.model.transformer import Transformer

# A step whose padded batch would be more than this many times its real tokens runs as two forwards
# (decode rows, then prefill rows), so that decodes are not padded to a long prefill chunk.
MAX_PADDING_FACTOR = 2.0


def forward_passes(plan: StepPlan) -> list[list[list[int]]]:
    """Split a step into forwards: passes[k][d] = indices of shard d's rows in forward k.

    Decided from the whole plan, so every rank of every shard runs the same number of forwards (an
    expert-parallel layer needs all ranks in each of them)."""
    real = plan.num_tokens
    padded = sum(len(rows) * max((len(r.token_ids) for r in rows), default=0) for rows in plan.shards)
    decode = [[i for i, r in enumerate(rows) if len(r.token_ids) == 1] for rows in plan.shards]
    prefill = [[i for i, r in enumerate(rows) if len(r.token_ids) > 1] for rows in plan.shards]
    if padded <= MAX_PADDING_FACTOR * real or not any(decode) or not any(prefill):
        return [[list(range(len(rows))) for rows in plan.shards]]
    return [decode, prefill]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.pool = KVPool.for_model(model, num_blocks, block_size)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def prepare(self, rows: list[RowPlan]) -> dict[str, torch.Tensor]:
        """Batch tensors for `rows`: input_ids_BL, pos_BL, token_mask_BL, slots_BL, key_slots_BS, logits_at."""
        bs, scratch = self.pool.block_size, self.pool.scratch_block
        B = len(rows)
        L = max((len(r.token_ids) for r in rows), default=1)
        S = max((r.start + len(r.token_ids) for r in rows), default=1)
        ids = torch.zeros(B, L, dtype=torch.long)
        pos = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        table = torch.full((B, max((len(r.block_ids) for r in rows), default=0) + 1), scratch, dtype=torch.long)
        logits_at: list[int] = []
        for b, r in enumerate(rows):
            n = len(r.token_ids)
            ids[b, :n] = torch.tensor(r.token_ids)
            # Padding repeats the row's last position: its queries stay valid (no empty softmax row)
            # and it does not widen S; its outputs are never read.
            pos[b] = torch.arange(r.start, r.start + L).clamp_(max=r.start + n - 1)
            mask[b, :n] = True
            table[b, :len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.long)
            logits_at.extend(range(b * L + r.logits_from, b * L + n))
        slot_BL = table.gather(1, pos // bs) * bs + pos % bs
        slot_BL = torch.where(mask, slot_BL, torch.full_like(slot_BL, scratch * bs))
        s = torch.arange(S)
        key_block = table[:, (s // bs).clamp(max=table.shape[1] - 1)]
        key_slots_BS = key_block * bs + s % bs
        return dict(input_ids_BL=ids, pos_BL=pos, token_mask_BL=mask, slots_BL=slot_BL,
                    key_slots_BS=key_slots_BS, logits_at=torch.tensor(logits_at, dtype=torch.long))

    @torch.inference_mode()
    def execute(self, rows: list[RowPlan]) -> torch.Tensor:
        """Run one forward over `rows` (may be empty: ranks of an expert-parallel model must still take
        part in every layer's collectives). Returns logits [N, V] in at least float32 (float64 for a float64
        model), N = sum of rows' num_logits, in row order."""
        t = self.prepare(rows)
        cache = PagedKVCache(self.pool, t["slots_BL"], t["key_slots_BS"])
        out = self.model(t["input_ids_BL"], pos_BL=t["pos_BL"], cache=cache, token_mask_BL=t["token_mask_BL"],
                         logits_at=t["logits_at"])
        return upcast(out.logits)

    def execute_plan(self, plan: StepPlan, dp_rank: int = 0) -> torch.Tensor:
        """This rank's part of a step: logits of shard `dp_rank`'s rows, in row order."""
        rows = plan.shards[dp_rank]
        passes = forward_passes(plan)
        if len(passes) == 1:
            return self.execute(rows)
        per_row: dict[int, torch.Tensor] = {}
        for p in passes:
            idx = p[dp_rank]
            logits = self.execute([rows[i] for i in idx])
            off = 0
            for i in idx:
                per_row[i] = logits[off:off + rows[i].num_logits]
                off += rows[i].num_logits
        if not rows:
            return torch.empty(0, self.model.cfg.vocab_size)
        return torch.cat([per_row[i] for i in range(len(rows))])
