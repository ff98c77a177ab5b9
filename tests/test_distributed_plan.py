"""attnkit.distributed's planning, layouts and lse merge, checked in one process against brute force."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import visible

import attnkit
from attnkit.distributed._blocks import (
    block,
    fused_ring_plan,
    gathered_plan,
    ring_plan,
    varlen_plan,
)
from attnkit.distributed._layout import Segment, local_segments
from attnkit.distributed._merge import merge_states

WINDOWS = [(-1, -1), (-1, 0), (0, 0), (2, 0), (3, 1), (0, 4), (7, 2), (1, -1), (-1, 3)]


def _global_visible(qpos: int, kpos: int, left: int, right: int) -> bool:
    """The band on global positions (one sequence, Sq == Sk: no offset)."""
    return visible(qpos, kpos, 1, 1, left, right)


def _block_cells(blk, q_global, k_global, left, right):
    """Global (qpos, kpos) pairs the block computes as visible, using the block operator's own mask rule on the
    block's rectangle; q_global/k_global map buffer rows to global positions."""
    cells = set()
    for i in range(blk.q_len):
        for j in range(blk.k_len):
            if visible(i, j, blk.q_len, blk.k_len, blk.window_left, blk.window_right):
                cells.add((q_global[blk.q_start + i], k_global[blk.k_start + j]))
            else:
                # Masked inside the block must mean masked globally.
                assert not _global_visible(q_global[blk.q_start + i], k_global[blk.k_start + j], left, right)
    return cells


def _positions(segments):
    rows = {}
    for seg in segments:
        for i in range(seg.length):
            rows[seg.offset + i] = seg.start + i
    return rows


def test_block_mask_is_the_global_mask_on_random_rectangles():
    rng = random.Random(0)
    for _ in range(3000):
        q = Segment(rng.randint(0, 30), rng.randint(1, 9), rng.randint(0, 4))
        k = Segment(rng.randint(0, 30), rng.randint(1, 9), rng.randint(0, 4))
        left, right = rng.choice([-1, 0, 1, 2, 3, 5, 8, 13]), rng.choice([-1, 0, 1, 2, 3, 5, 8, 13])
        blk = block(q, k, left, right)
        want = {
            (q.start + i, k.start + j)
            for i in range(q.length)
            for j in range(k.length)
            if _global_visible(q.start + i, k.start + j, left, right)
        }
        if blk is None:
            assert not want
            continue
        assert blk.window_left >= -1 and blk.window_right >= -1
        got = _block_cells(blk, _positions([q]), _positions([k]), left, right)
        assert got == want, (q, k, left, right, blk)
        # The bottom-right corner lies on global distance `shift`.
        corner_q = q.start + blk.q_start - q.offset + blk.q_len - 1
        corner_k = k.start + blk.k_start - k.offset + blk.k_len - 1
        assert blk.shift == corner_q - corner_k


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_local_segments_tile_the_sequence(layout, world):
    local_len = 6
    seen = []
    for rank in range(world):
        segs = local_segments(layout, rank, world, local_len)
        assert sum(s.length for s in segs) == local_len
        seen += [s.start + i for s in segs for i in range(s.length)]
    assert sorted(seen) == list(range(world * local_len))
    if layout == "zigzag":
        c = local_len // 2
        for rank in range(world):
            segs = local_segments(layout, rank, world, local_len)
            chunks = {(s.start + i) // c for s in segs for i in range(s.length)}
            assert chunks == {rank, 2 * world - 1 - rank}
            assert len(segs) == (1 if rank == world - 1 else 2)  # the middle two chunks are one run


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_plan_computes_each_visible_pair_once(world, layout, window):
    local_len = 6
    seqlen = world * local_len
    left, right = window
    for plan in (
        ring_plan(layout, world, local_len, left, right),
        fused_ring_plan(layout, world, local_len, left, right),
    ):
        for rank in range(world):
            q_global = _positions(local_segments(layout, rank, world, local_len))
            counted: dict[tuple[int, int], int] = {}
            for step, blocks in enumerate(plan[rank]):
                source = (rank - step) % world
                k_global = _positions(local_segments(layout, source, world, local_len))
                for blk in blocks:
                    for cell in _block_cells(blk, q_global, k_global, left, right):
                        counted[cell] = counted.get(cell, 0) + 1
            want = {
                (qp, kp) for qp in q_global.values() for kp in range(seqlen) if _global_visible(qp, kp, left, right)
            }
            assert set(counted) == want
            assert set(counted.values()) <= {1}


def test_zigzag_balances_causal_work_and_fuses_full_blocks():
    world, local_len = 4, 8

    def cells(blocks):  # visible pairs: what a causal kernel computes (it skips masked tiles)
        return sum(visible(i, j, b.q_len, b.k_len, b.window_left, b.window_right)
                   for b in blocks for i in range(b.q_len) for j in range(b.k_len))  # fmt: skip

    work = []
    for rank, steps in enumerate(fused_ring_plan("zigzag", world, local_len, -1, 0)):
        work.append(sum(cells(s) for s in steps))
        for step, blocks in enumerate(steps[1:], start=1):
            # Off the diagonal step a zigzag rank makes a single unmasked call: both query chunks against the
            # earlier rank's first chunk, or its late chunk against both chunks of a later rank.
            assert len(blocks) == 1 and blocks[0].full
            assert (blocks[0].q_len, blocks[0].k_len) == ((8, 4) if (rank - step) % world < rank else (4, 8))
    assert len(set(work)) == 1
    contiguous = [sum(cells(s) for s in steps) for steps in fused_ring_plan("contiguous", world, local_len, -1, 0)]
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gathered_plan_computes_each_visible_pair_once(layout, window):
    world, local_len = 3, 4
    left, right = window
    k_global = {j: j for j in range(world * local_len)}
    for rank, blocks in enumerate(gathered_plan(layout, world, local_len, left, right)):
        q_global = _positions(local_segments(layout, rank, world, local_len))
        cells = [c for b in blocks for c in _block_cells(b, q_global, k_global, left, right)]
        want = {(qp, kp) for qp in q_global.values() for kp in k_global if _global_visible(qp, kp, left, right)}
        assert sorted(cells) == sorted(want)
        if right == 0:
            assert all(b.shift == 0 for b in blocks)  # causal: every block ends on the diagonal (ALiBi is exact)


@pytest.mark.parametrize("window", WINDOWS)
def test_varlen_plan_computes_each_visible_pair_once(window):
    rng = random.Random(1)
    left, right = window
    for _ in range(30):
        world = rng.choice([1, 2, 3, 4])
        local_len = rng.randint(1, 7)
        total = world * local_len
        lengths, used = [], 0
        while used < total and rng.random() < 0.9:
            n = rng.randint(0, total - used)
            lengths.append(n)
            used += n
        lengths = lengths or [0]
        cu = tuple(itertools.accumulate([0, *lengths]))
        plan = varlen_plan(world, local_len, cu, left, right)
        for rank, calls in enumerate(plan):
            cells = []
            for call in calls:
                for b in range(len(call.seqs)):
                    qa, qb = call.cu_q[b], call.cu_q[b + 1]
                    ka, kb = call.cu_k[b], call.cu_k[b + 1]
                    sq, sk = qb - qa, kb - ka
                    for i in range(sq):
                        for j in range(sk):
                            qp = rank * local_len + call.q_start + qa + i
                            kp = call.k_start + ka + j
                            if visible(i, j, sq, sk, call.window_left, call.window_right):
                                cells.append((qp, kp))
            want = []
            for st, en in itertools.pairwise(cu):
                for qp in range(max(st, rank * local_len), min(en, (rank + 1) * local_len)):
                    want += [(qp, kp) for kp in range(st, en) if _global_visible(qp, kp, left, right)]
            assert sorted(cells) == sorted(want), (world, local_len, cu, rank, calls)


def test_varlen_plan_groups_sequences_into_few_calls():
    # 2 ranks of 8 rows; sequences [0, 3), [3, 10), [10, 16): causal makes one call per rank.
    plan = varlen_plan(2, 8, (0, 3, 10, 16), -1, 0)
    assert [len(calls) for calls in plan] == [1, 1]
    assert plan[1][0].seqs == (1, 2) and plan[1][0].cu_q == (0, 2, 8) and plan[1][0].cu_k == (0, 7, 13)


# ---- merge ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_of_two_key_halves_is_attention_over_all_keys(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 8, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 13, 2, 8, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 13, 2, 5, generator=g, dtype=torch.float64).to(dtype)
    whole, lse = attnkit.attention(q, k, v, return_lse=True)
    a, la = attnkit.attention(q, k[:, :6], v[:, :6], return_lse=True)
    b, lb = attnkit.attention(q, k[:, 6:], v[:, 6:], return_lse=True)
    out, merged = merge_states(a.to(la.dtype), la, b, lb)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, whole.to(out.dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(merged, lse, atol=tol, rtol=tol)


def test_merge_empty_rows_and_nan():
    inf = float("inf")
    out_a = torch.tensor([[[[1.0]], [[0.0]], [[0.0]], [[2.0]]]])  # (B=1, S=4, H=1, D=1)
    lse_a = torch.tensor([[[0.0, -inf, -inf, float("nan")]]])  # (B=1, H=1, S=4)
    out_b = torch.tensor([[[[0.0]], [[3.0]], [[0.0]], [[1.0]]]])
    lse_b = torch.tensor([[[-inf, 1.0, -inf, 0.0]]])
    out, lse = merge_states(out_a, lse_a, out_b, lse_b)
    assert out[0, :3, 0, 0].tolist() == [1.0, 3.0, 0.0]  # one side empty: the other unchanged; both: 0
    assert lse[0, 0, :3].tolist() == [0.0, 1.0, -inf]
    assert out[0, 3].isnan().all() and lse[0, 0, 3].isnan()
