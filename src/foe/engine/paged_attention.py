"""Attention over the paged KV pool for one packed step: `PackedStep` (what the runner builds once per
step) and `PagedKVCache` (the model's `KVCache`, one per forward).

A step is one flat token stream [1, T]: the decode rows (one token each) first, then the multi-token
rows (prompt chunks). Per layer, `PagedKVCache.attend`
- writes the new keys/values at their slots (`KVPool.write`);
- decode rows: one call of the native kernel (`kernels.py`) reads their keys and values in place from
  their blocks. Without the kernel (no compiler, or a CUDA pool), their blocks are gathered whole, as
  contiguous block-sized rows (`index_select` into a buffer every layer reuses, so no per-slot indexing
  and no fresh pages), and one SDPA call with a length mask covers them;
- a row with no earlier context (a fresh prompt, or its first chunk) attends to its own new keys with
  `is_causal`: no pool read at all;
- a row continuing a context (a later chunk, a prefix-cache hit, a recompute) gathers its blocks and
  uses a causal mask offset by its start, also built once per step.
Nothing here knows about scheduling; rows arrive as `RowPlan`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from foe.engine import kernels
from foe.engine.kv_cache import KVPool, blocks_needed
from foe.engine.request import RowPlan
from foe.model.kv_cache import KVCache


@dataclass
class ContextRow:
    """A multi-token row's place in the packed stream, and (when it continues a context) its blocks."""

    offset: int  # first token in the packed stream
    length: int
    blocks: torch.Tensor | None  # block ids covering positions 0..start+length-1; None: no earlier context
    mask: torch.Tensor | None  # [1, 1, length, S]: key s visible to query l when s <= start + l


@dataclass
class PackedStep:
    """One step's rows as a flat token stream, with what attention needs, built once per step."""

    input_ids: torch.Tensor  # [1, T]
    pos: torch.Tensor  # [1, T] absolute positions
    slots: torch.Tensor  # [T] pool slot of each token: block * block_size + offset
    logits_at: torch.Tensor  # [N] packed-stream rows whose logits are wanted, in packed order
    restore: torch.Tensor | None  # logits in packed order -> row order (None: same order)
    num_decode: int  # the first num_decode tokens are decode rows, one each
    decode_table: torch.Tensor  # [num_decode, W] their block ids, padded with the scratch block
    decode_lens: torch.Tensor  # [num_decode] keys each decode row sees (its position + 1)
    decode_mask: torch.Tensor  # [num_decode, 1, 1, W * block_size]: True for positions <= the row's
    context_rows: list[ContextRow]

    @classmethod
    def build(cls, rows: list[RowPlan], block_size: int, scratch_block: int) -> PackedStep:
        bs = block_size
        # Decode rows first (stable), so they are one slice of the stream and one attention call.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].token_ids) > 1)
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        logits_at: list[int] = []
        dec_pos: list[int] = []
        dec_tables: list[list[int]] = []
        context_rows: list[ContextRow] = []
        off = 0
        for i in order:
            r = rows[i]
            n = len(r.token_ids)
            ids.extend(r.token_ids)
            logits_at.extend(range(off + r.logits_from, off + n))
            if n == 1:
                dec_pos.append(r.start)
                dec_tables.append(r.block_ids[:blocks_needed(r.start + 1, bs)])
            else:
                end = r.start + n
                table = torch.tensor(r.block_ids[:blocks_needed(end, bs)], dtype=torch.long)
                p = torch.arange(r.start, end)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                if r.start == 0:
                    context_rows.append(ContextRow(off, n, None, None))
                else:
                    keys = torch.arange(table.numel() * bs)
                    mask = (keys[None, :] <= p[:, None])[None, None]
                    context_rows.append(ContextRow(off, n, table, mask))
            off += n
        W = max((len(t) for t in dec_tables), default=0)
        dec_blocks = torch.full((len(dec_tables), W), scratch_block, dtype=torch.long)
        for b, t in enumerate(dec_tables):
            dec_blocks[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        dp = torch.tensor(dec_pos, dtype=torch.long)
        dec_slots = dec_blocks.gather(1, (dp // bs)[:, None]).squeeze(1) * bs + dp % bs if dec_pos else dp
        decode_mask = (torch.arange(W * bs)[None, :] <= dp[:, None])[:, None, None, :]
        restore = None
        if order != sorted(order):
            counts = [rows[i].num_logits for i in order]
            starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
            at = dict(zip(order, starts))
            restore = torch.tensor([at[i] + k for i in range(len(rows)) for k in range(rows[i].num_logits)],
                                   dtype=torch.long)
        all_slots = torch.cat([dec_slots, *slots])
        return cls(input_ids=torch.tensor(ids, dtype=torch.long).view(1, -1),
                   pos=torch.cat([dp, *pos]).view(1, -1), slots=all_slots,
                   logits_at=torch.tensor(logits_at, dtype=torch.long), restore=restore,
                   num_decode=len(dec_pos), decode_table=dec_blocks, decode_lens=dp + 1, decode_mask=decode_mask,
                   context_rows=context_rows)

    def to(self, device: torch.device) -> PackedStep:
        """The same step with its tensors on `device` (built on the CPU, used where the pool lives)."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        fields = {f: move(v) if isinstance(v, torch.Tensor) else v for f, v in vars(self).items()}
        fields["context_rows"] = [ContextRow(r.offset, r.length, move(r.blocks), move(r.mask))
                                  for r in self.context_rows]
        return PackedStep(**fields)


class PagedKVCache(KVCache):
    """One forward's view of the pool for a `PackedStep` (batch dimension 1, the packed stream)."""

    def __init__(self, pool: KVPool, step: PackedStep, use_kernel: bool) -> None:
        self.pool, self.step, self.use_kernel = pool, step, use_kernel
        self.key_index: torch.Tensor | None = None

    def attend(self, layer: int, q_BNLK: torch.Tensor, k_BMLK: torch.Tensor, v_BMLK: torch.Tensor,
               pos_BL: torch.Tensor) -> torch.Tensor:
        _, N, T, K = q_BNLK.shape
        M = k_BMLK.shape[1]
        gqa = N != M
        s, pool = self.step, self.pool
        if self.key_index is None:  # the same for every layer
            self.key_index = pool.key_index(s.slots)
        pool.write(layer, s.slots, self.key_index, k_BMLK[0].transpose(0, 1), v_BMLK[0].transpose(0, 1))
        rows = s.context_rows
        if not s.num_decode and len(rows) == 1 and rows[0].blocks is None:  # one fresh prompt
            return F.scaled_dot_product_attention(q_BNLK, k_BMLK, v_BMLK, is_causal=True, enable_gqa=gqa)
        o = torch.empty_like(q_BNLK)
        if s.num_decode:
            D = s.num_decode
            q = q_BNLK[0, :, :D].transpose(0, 1)  # [D, N, K]
            if self.use_kernel and q.dtype == pool.k.dtype:
                with record_function("foe::paged_decode_attention"):  # named in profiles
                    o_dec = kernels.paged_decode_attention(q, pool.k[layer], pool.v[layer], s.decode_table,
                                                           s.decode_lens)
            else:
                k, v = pool.gather(layer, s.decode_table.view(-1), D)
                o_dec = F.scaled_dot_product_attention(q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype),
                                                       attn_mask=s.decode_mask, enable_gqa=gqa)[:, :, 0]
            o[0, :, :D] = o_dec.transpose(0, 1)
        for r in rows:
            span = slice(r.offset, r.offset + r.length)
            q = q_BNLK[:, :, span]
            if r.blocks is None:
                o[:, :, span] = F.scaled_dot_product_attention(q, k_BMLK[:, :, span], v_BMLK[:, :, span],
                                                               is_causal=True, enable_gqa=gqa)
            else:
                k, v = pool.gather(layer, r.blocks, 1)
                o[:, :, span] = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=r.mask,
                                                               enable_gqa=gqa)
        return o
