"""Paged KV cache: a pool of fixed-size blocks, the block manager that hands them out, and the
`PagedKVCache` view through which the unchanged model reads and writes pages for one step.

- `BlockManager` is pure bookkeeping (no tensors): a free list, reference counts and, optionally,
  prefix caching (full prompt blocks are hashed by their token chain; a new request whose prompt starts
  with cached blocks shares them instead of recomputing), and forking (samples of one prompt share its
  blocks). The scheduler owns one per data-parallel shard.
- `KVPool` holds the tensors, one block per row: keys [n_layers, num_blocks + 1, H, K, block_size]
  (transposed within a block) and values [n_layers, num_blocks + 1, block_size, H, K]. The extra last
  block is scratch: it pads block tables (its keys are always masked out).

Attention over the pool (`PagedKVCache`) is in `paged_attention.py`.

Sized from the model's attention modules (`model.layers[0].attn.num_kv_heads`), so a model sharded by
`foe.parallel` allocates only its own KV heads. Nothing here knows about scheduling or processes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from foe.engine.request import Sequence
    from foe.model.transformer import Transformer


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out block ids of one KV pool. Blocks are shared (ref_count > 1) through prefix caching and forks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Free blocks in LRU order; a free block may still hold a cached prefix (its hash stays in
        # `cached` until the block is handed out again).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.block_hash: dict[int, int] = {}  # block id -> prefix hash
        self.seq_hashes: dict[int, list[int]] = {}  # seq id -> hashes of its leading full blocks
        self.num_hit_tokens = 0  # prompt tokens served from the prefix cache so far

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash.pop(block, None)
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
        self.ref_count[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False (and nothing taken) if short."""
        need = blocks_needed(num_tokens, self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        seq.block_ids.extend(self._take() for _ in range(need))
        return True

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks (finished, aborted or preempted); cached ones stay findable."""
        for block in reversed(seq.block_ids):  # tail first: the prefix head is evicted last
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_ids = []
        self.seq_hashes.pop(seq.seq_id, None)

    def share(self, src: Sequence, dst: Sequence, num_tokens: int) -> int:
        """Give `dst` (holding no blocks) `src`'s full blocks among its first `num_tokens` tokens, by
        reference; returns the tokens they hold. Works with prefix caching off."""
        blocks = src.block_ids[:num_tokens // self.block_size]
        for block in blocks:
            self.ref_count[block] += 1
        dst.block_ids = list(blocks)
        return len(blocks) * self.block_size

    # ---- prefix caching ---------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, upto_tokens: int) -> list[int]:
        """Chained hashes of the full blocks among the first `upto_tokens` tokens."""
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        ids, bs = seq.token_ids, self.block_size
        for i in range(len(hashes), upto_tokens // bs):
            hashes.append(hash((hashes[-1] if hashes else None, tuple(ids[i * bs:(i + 1) * bs]))))
        return hashes[:upto_tokens // bs]

    def match_prefix(self, seq: Sequence) -> int:
        """For a new sequence: share the cached blocks its prompt starts with; returns tokens covered.

        The last prompt token is always recomputed (its logits start generation), so at most
        num_tokens - 1 tokens are matched; requests that want prompt logprobs match nothing."""
        if not self.enable_prefix_caching or seq.block_ids or seq.wants_prompt_logprobs:
            return 0
        matched = 0
        for h in self._hashes(seq, seq.num_tokens - 1):
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_ids.append(block)
            matched += self.block_size
        self.num_hit_tokens += matched
        return matched

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's full, computed blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        for i, h in enumerate(self._hashes(seq, seq.num_computed)):
            block = seq.block_ids[i]
            if h not in self.cached and block not in self.block_hash:
                self.cached[h], self.block_hash[block] = block, h


class KVPool:
    """The K and V tensors of one rank, one block per row of the second axis:

    - keys   [n_layers, num_blocks + 1, H, K, block_size]: transposed within a block, so that a query's
      scores against a block's tokens are K vector multiply-adds across the block (the decode kernel);
    - values [n_layers, num_blocks + 1, block_size, H, K]: a token's value rows are contiguous.
    Token slot s lives in block s // block_size at offset s % block_size."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.k = torch.zeros(n_layers, num_blocks + 1, n_kv_heads, head_dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(n_layers, num_blocks + 1, block_size, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = n_kv_heads, head_dim
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # see gather

    def key_index(self, slots_T: torch.Tensor) -> torch.Tensor:
        """Flat element indices, in (token, head, dim) order, of T tokens' keys within one layer of `k`."""
        H, K, bs = self.num_kv_heads, self.head_dim, self.block_size
        hk = torch.arange(H * K, device=slots_T.device) * bs  # (head, dim) strides inside a block
        return ((slots_T // bs * (H * K * bs) + slots_T % bs)[:, None] + hk[None, :]).view(-1)

    def write(self, layer: int, slots_T: torch.Tensor, key_index: torch.Tensor, k_TMK: torch.Tensor,
              v_TMK: torch.Tensor) -> None:
        """Store T tokens' keys and values at their slots (`key_index` = `self.key_index(slots_T)`)."""
        self.k[layer].view(-1).index_copy_(0, key_index, k_TMK.reshape(-1).to(self.k.dtype))
        self.v[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots_T, v_TMK.to(self.v.dtype))

    @classmethod
    def for_model(cls, model: Transformer, num_blocks: int, block_size: int) -> KVPool:
        attn = model.layers[0].attn
        w = model.embed.weight
        return cls(len(model.layers), num_blocks, block_size, attn.num_kv_heads, attn.head_dim, w.dtype, w.device)

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    def gather(self, layer: int, blocks: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `blocks` (rows x W of them, row-major), as [rows, H, W * block_size, K] each.

        Blocks are copied whole (`index_select` of contiguous rows into buffers that persist and only grow,
        so no fresh pages per layer); keys are then transposed back into token order."""
        n, bs, H, K = blocks.numel(), self.block_size, self.num_kv_heads, self.head_dim
        if self._buffers is None or self._buffers[0].shape[0] < n:
            size = max(n, 2 * (self._buffers[0].shape[0] if self._buffers else 0))
            self._buffers = (self.k.new_empty(size, H * K * bs), self.v.new_empty(size, bs * H * K))
        k_buf, v_buf = self._buffers[0][:n], self._buffers[1][:n]
        torch.index_select(self.k[layer].view(self.num_blocks + 1, -1), 0, blocks, out=k_buf)
        torch.index_select(self.v[layer].view(self.num_blocks + 1, -1), 0, blocks, out=v_buf)
        W = n // rows
        k = k_buf.view(rows, W, H, K, bs).permute(0, 2, 1, 4, 3).reshape(rows, H, W * bs, K)
        return k, v_buf.view(rows, W * bs, H, K).transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
