"""Packed steps over the paged pool against the plain full forward (no cache, no packing).

Each case builds rows of every kind in one step (decodes, fresh prompts, continuation chunks, rows
sharing prefix blocks, rows given in an order the packing changes), with blocks scattered over the
pool, and compares every row's logits with the full forward of that row's whole token prefix.
"""

from __future__ import annotations

import random

import pytest
import torch

from foe.engine import kernels
from foe.engine.paged_attention import PackedStep
from foe.engine.request import RowPlan, StepPlan
from foe.engine.runner import ModelRunner
from tests.conftest import build, tiny

BS = 4
# Decode attention by the native kernel and by the torch path (gather + SDPA), each against the reference.
PATHS = [pytest.param(True, id="kernel", marks=pytest.mark.skipif(
    not kernels.decode_kernel_available(torch.device("cpu")), reason="native kernel not buildable here")),
         pytest.param(False, id="torch")]


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def run_case(model, rng: random.Random, runner: ModelRunner, free: list[int]) -> None:
    """Warm some sequences up to a context, then run one step mixing decodes and chunks."""
    vocab = model.cfg.vocab_size
    seqs = []  # (tokens, blocks, computed)
    for _ in range(rng.randint(1, 5)):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(2, 30))]
        blocks = [free.pop() for _ in range(-(-(len(tokens) + 1) // BS))]
        computed = rng.randint(1, len(tokens) - 1)
        runner.execute([RowPlan(len(seqs), tokens[:computed], 0, blocks, computed)])  # context, no logits
        seqs.append((tokens, blocks, computed))
    rows, expect = [], []
    for i, (tokens, blocks, computed) in enumerate(seqs):
        # the rest of the sequence: a decode (one token) or a continuation chunk
        n = 1 if rng.random() < 0.5 else len(tokens) - computed
        chunk = tokens[computed:computed + n]
        first = rng.randint(0, len(chunk) - 1)  # logits for a suffix of the chunk
        rows.append(RowPlan(i, chunk, computed, blocks, first))
        expect.append(full_logits(model, tokens[:computed + n])[computed + first:])
    for _ in range(rng.randint(0, 2)):  # fresh prompts
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        blocks = [free.pop() for _ in range(-(-len(tokens) // BS))]
        rows.append(RowPlan(100 + len(rows), tokens, 0, blocks, len(tokens) - 1))
        expect.append(full_logits(model, tokens)[-1:])
    order = list(range(len(rows)))
    rng.shuffle(order)
    got = runner.execute_plan(StepPlan([[rows[i] for i in order]]))
    torch.testing.assert_close(got, torch.cat([expect[i] for i in order]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("arch", ["moe", "foe"])
def test_random_packed_steps_equal_the_full_forward(arch: str, kernel: bool) -> None:
    model = build(tiny(arch))
    rng = random.Random(0)
    for case in range(6):
        runner = ModelRunner(model, num_blocks=160, block_size=BS, paged_kernel=kernel)
        free = list(range(160))
        rng.shuffle(free)  # scattered, out-of-order blocks
        run_case(model, rng, runner, free)


@pytest.mark.parametrize("kernel", PATHS)
def test_shared_prefix_blocks_and_a_lone_decode(kernel: bool) -> None:
    """Two sequences reading the same prefix blocks (prefix cache / n > 1), one decoding and one
    continuing with a chunk, in one step; then a step with only a decode."""
    model = build(tiny("foe"))
    runner = ModelRunner(model, num_blocks=32, block_size=BS, paged_kernel=kernel)
    prefix = list(range(1, 9))  # two full blocks
    runner.execute([RowPlan(0, prefix, 0, [7, 3], 8)])
    a, b = prefix + [11, 12, 13], prefix + [21, 22]
    rows = [RowPlan(1, a[8:], 8, [7, 3, 20], 2), RowPlan(2, b[8:9], 8, [7, 3, 9], 0)]
    got = runner.execute_plan(StepPlan([rows]))
    torch.testing.assert_close(got, torch.cat([full_logits(model, a)[10:], full_logits(model, b[:9])[8:]]),
                               atol=2e-5, rtol=1e-4)
    got = runner.execute([RowPlan(2, b[9:], 9, [7, 3, 9], 0)])
    torch.testing.assert_close(got, full_logits(model, b)[9:], atol=2e-5, rtol=1e-4)


def test_packing_puts_decodes_first_and_restores_row_order() -> None:
    rows = [RowPlan(0, [1, 2, 3], 0, [5], 1), RowPlan(1, [4], 6, [2, 0], 0), RowPlan(2, [7, 8], 3, [1, 3], 1)]
    step = PackedStep.build(rows, block_size=4, scratch_block=9)
    assert step.input_ids.tolist() == [[4, 1, 2, 3, 7, 8]]
    assert step.pos.tolist() == [[6, 0, 1, 2, 3, 4]]
    assert step.slots.tolist() == [0 * 4 + 2, 20, 21, 22, 1 * 4 + 3, 3 * 4 + 0]
    assert step.num_decode == 1 and step.decode_table.tolist() == [[2, 0]] and step.decode_lens.tolist() == [7]
    assert step.decode_mask[0, 0, 0].tolist() == [True] * 7 + [False]
    assert step.logits_at.tolist() == [0, 2, 3, 5]  # packed order: row 1, row 0 (2), row 2
    assert step.restore.tolist() == [1, 2, 0, 3]  # back to row order
    assert [r.blocks is None for r in step.context_rows] == [True, False]


def test_an_idle_rank_runs_an_empty_step() -> None:
    runner = ModelRunner(build(tiny("moe")), num_blocks=4, block_size=BS)
    assert runner.execute([]).shape == (0, runner.model.cfg.vocab_size)


# (N, M, K, block size): any size, and the compile-time sizes the kernel specialises (block 16, K 32/64/128)
SHAPES = [(8, 2, 16, 4), (8, 4, 32, 16), (16, 4, 64, 16), (4, 1, 128, 16), (6, 3, 48, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-M{}-K{}-bs{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kernel_against_a_float64_reference(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    """float64 accumulates in double (to 1e-12); float32 to 1e-5; bf16 reads bf16 pages."""
    if not kernels.decode_kernel_available(torch.device("cpu")):
        pytest.skip("native kernel not buildable here")
    g = torch.Generator().manual_seed(0)
    N, M, K, bs = shape
    D, W = 5, 6
    k_pool = torch.randn(40, M, K, bs, generator=g).to(dtype)  # KVPool's layouts
    v_pool = torch.randn(40, bs, M, K, generator=g).to(dtype)
    table = torch.randperm(40, generator=g)[:D * W].view(D, W)
    lens = torch.tensor([1, 5, W * bs, 13, 2 * bs])
    q = torch.randn(D, N, K, generator=g).to(dtype)
    got = kernels.paged_decode_attention(q, k_pool, v_pool, table, lens)
    # reference: each row's keys and values in token order, float64, a masked SDPA
    k = k_pool.double()[table].permute(0, 2, 1, 4, 3).reshape(D, M, W * bs, K)
    v = v_pool.double()[table].reshape(D, W * bs, M, K).transpose(1, 2)
    mask = (torch.arange(W * bs)[None, :] < lens[:, None])[:, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q.double().unsqueeze(2), k, v, attn_mask=mask,
                                                           enable_gqa=True)[:, :, 0]
    tol = {torch.float64: dict(atol=1e-12, rtol=0), torch.float32: dict(atol=1e-5, rtol=1e-5),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]
    torch.testing.assert_close(got.double(), ref, **tol)


def test_the_kernel_refuses_tables_that_would_read_outside_the_pool() -> None:
    if not kernels.decode_kernel_available(torch.device("cpu")):
        pytest.skip("native kernel not buildable here")
    k_pool, v_pool = torch.zeros(4, 1, 16, 16), torch.zeros(4, 16, 1, 16)
    q = torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.paged_decode_attention(q, k_pool, v_pool, torch.tensor([[4]]), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="keys; its table holds 16"):
        kernels.paged_decode_attention(q, k_pool, v_pool, torch.tensor([[0]]), torch.tensor([17]))


def test_a_step_moves_to_a_device_whole() -> None:
    """`PackedStep.to` moves every tensor (checked on the meta device: no GPU needed)."""
    rows = [RowPlan(0, [1, 2, 3], 0, [5], 1), RowPlan(1, [4], 6, [2, 0], 0), RowPlan(2, [7, 8], 3, [1, 3], 1)]
    step = PackedStep.build(rows, block_size=4, scratch_block=9).to(torch.device("meta"))
    tensors = [v for v in vars(step).values() if isinstance(v, torch.Tensor)]
    tensors += [t for r in step.context_rows for t in (r.blocks, r.mask) if t is not None]
    assert len(tensors) >= 10 and all(t.device.type == "meta" for t in tensors)


def test_the_native_kernel_is_for_cpu_tensors_only() -> None:
    """A model off the CPU (meta here, CUDA in use) takes the torch path; asking for the kernel there, or
    handing it such tensors, is an error, not a crash in C++."""
    model = build(tiny("moe")).to("meta")
    assert not ModelRunner(model, num_blocks=4, block_size=BS).paged_kernel
    with pytest.raises(ValueError, match="CPU only"):
        ModelRunner(model, num_blocks=4, block_size=BS, paged_kernel=True)
    if kernels.decode_kernel_available(torch.device("cpu")):
        meta = torch.zeros(4, 1, 16, 16, device="meta")
        with pytest.raises(ValueError, match="CPU kernel"):
            kernels.paged_decode_attention(torch.zeros(1, 2, 16, device="meta"), meta, meta,
                                           torch.tensor([[0]]), torch.tensor([3]))
