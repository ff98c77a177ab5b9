"""The benchmark's correctness check (``attnkit.bench.correctness.verify``) on CPU: the sampled recomputation is
exact, a right provider passes, and planted corruptions fail that a partial check (batch 0 only, the first and
last heads, the last 128 rows, dk/dv only on small problems, one call) would let through.

Sizes are scaled down to keep CPU time small: the full-check threshold is lowered so that these small problems
take the sampled path, and blocks are 16 rows (64 by default), so 100 query rows give the judged blocks 0-15,
42-57 and 84-99."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import plain_attention

import attnkit
from attnkit.bench import correctness
from attnkit.bench.cases import Case
from attnkit.bench.correctness import blocks, choose_sample, recompute, repeat_error, verify

S = 100
BLOCK = 16
MIDDLE_KEYS = range(S // 2 - 2, S // 2 + 3)  # inside the middle key block 42-57


@pytest.fixture
def sampled(monkeypatch):
    """Every case takes the sampled path, with 16-row blocks; chunks of ~20 rows, so the chunked sums over
    query rows are exercised."""
    monkeypatch.setattr(correctness, "FULL_CHECK_SCORES", 0)
    monkeypatch.setattr(correctness, "ROW_BLOCK", BLOCK)
    monkeypatch.setattr(correctness, "CHUNK_BYTES", 1 << 18)


def inputs(case: Case, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    shape_k = (case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    return [torch.randn(s, generator=g).to(case.torch_dtype) for s in (shape_q, shape_k, shape_k, shape_q)]


def right(causal: bool):
    def fn(q, k, v):
        return plain_attention(q, k, v, causal)

    return fn


def exact_attention(q, k, v, dout, causal):
    """Independent float64 out, dq, dk, dv of the whole problem by autograd. Rows that see no key are given a
    zero score row before the softmax and zero probabilities after, so that their gradients are 0, not NaN."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[-1] ** -0.5
    sq, sk = q.shape[1], k.shape[1]
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    if causal:
        mask = torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + sk - sq
    seen = (~mask).any(-1)[:, None]
    probs = torch.softmax(torch.where(seen, scores.masked_fill(mask, -math.inf), 0.0), -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.where(seen, probs, 0.0), vv)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double()))


class _CorruptGrad(torch.autograd.Function):
    """Identity forward; backward adds ``amount`` to the gradient at rows ``rows`` of dim 1."""

    @staticmethod
    def forward(ctx, x, rows, amount):
        ctx.rows, ctx.amount = rows, amount
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, list(ctx.rows)] += ctx.amount
        return grad, None, None


def plus(region: tuple, amount: float = 0.5):
    """The right provider with ``amount`` added to ``out[region]``."""

    def fn(q, k, v):
        out = right(False)(q, k, v)
        bump = torch.zeros_like(out)
        bump[region] = amount
        return out + bump

    return fn


# ---- the sample ------------------------------------------------------------------------------------------
def test_blocks_are_first_middle_last():
    assert blocks(300, 64) == (*range(0, 64), *range(118, 182), *range(236, 300))
    assert blocks(192, 64) == tuple(range(192))  # three blocks cover it: all rows
    assert blocks(1, 64) == (0,)


def test_sample_small_problem_is_everything():
    sample = choose_sample(Case("bwd", "fp32", 2, 4, 2, 40, 50, 16, True))
    assert sample.full and sample.batches == (0, 1) and sample.rows == tuple(range(40))
    assert sample.keys == tuple(range(50)) and sample.kv_heads == (0, 1)


def test_sample_large_problem(sampled):
    case = Case("bwd", "bf16", 7, 16, 8, S, 2 * S, 64, True)
    sample = choose_sample(case, seed=3)
    assert not sample.full and sample.rows == blocks(S, BLOCK) and sample.keys == blocks(2 * S, BLOCK)
    assert {0, 6} <= set(sample.batches) and len(sample.batches) <= 3
    assert {0, 7} <= set(sample.kv_heads) and len(sample.kv_heads) <= 3
    assert choose_sample(case, seed=3) == sample  # reproducible
    drawn = {choose_sample(case, seed=s).batches for s in range(20)}
    assert len(drawn) > 1  # the seed moves the random batch
    assert choose_sample(Case("fwd", "bf16", 2, 4, 2, S, S, 64, False)).keys == ()


# ---- the recomputation is exact ------------------------------------------------------------------------------
@pytest.mark.parametrize("sq,sk", [(S, 70), (70, S), (S, S)], ids=["sq>sk", "sq<sk", "square"])
@pytest.mark.parametrize("causal", [False, True])
def test_recompute_matches_autograd_float64(sampled, sq, sk, causal):
    """The chunked float64 recomputation of the sample equals autograd over the whole problem, including rows
    that see no key (causal, sq > sk) and GQA."""
    case = Case("bwd", "fp32", 3, 6, 2, sq, sk, 16, causal)
    q, k, v, dout = inputs(case)
    sample = choose_sample(case)
    got = recompute(q, k, v, dout, case, sample, torch.float64)
    out, dq, dk, dv = exact_attention(q, k, v, dout, causal)
    b, r = torch.tensor(sample.batches), torch.tensor(sample.rows)
    keys, kv = torch.tensor(sample.keys), torch.tensor(sample.kv_heads)
    want = {"out": out[b][:, r], "dq": dq[b][:, r], "dk": dk[b][:, keys][:, :, kv], "dv": dv[b][:, keys][:, :, kv]}
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-12, atol=1e-12, msg=name)
    if causal and sq > sk:
        assert got["out"][:, :10].abs().max() == 0 and got["dq"][:, :10].abs().max() == 0


# ---- a right provider passes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_right_provider_passes_sampled(sampled, mode, causal):
    case = Case(mode, "fp32", 2, 4, 2, S, 87, 16, causal)
    q, k, v, dout = inputs(case)
    verdict = verify(right(causal), q, k, v, dout, case)
    assert verdict.ok, verdict.summary()
    assert set(verdict.errors) == {"out", "out_repeat"} | ({"dq", "dk", "dv"} if mode == "bwd" else set())
    assert "query rows 0-15, 42-57, 84-99 of 100" in verdict.scope and "all 4 query heads" in verdict.scope
    assert ("key rows 0-15, 35-50, 71-86 of 87" in verdict.scope) == (mode == "bwd")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_attnkit_reference_backend_passes_in_half_precision(sampled, dtype):
    case = Case("bwd", dtype, 2, 4, 1, S, S, 32, True)
    q, k, v, dout = inputs(case, seed=1)
    verdict = verify(lambda q, k, v: attnkit.attention(q, k, v, causal=True, backend="reference"), q, k, v, dout, case)
    assert verdict.ok, verdict.summary()


# ---- planted corruptions a partial check would let through --------------------------------------------------
B2 = Case("fwd", "fp32", 2, 4, 2, S, S, 16, False)


@pytest.mark.parametrize(
    "region",
    [
        # Outside the last 128 rows (rows 0..S-129), scaled down to the 16-row blocks.
        (slice(None), slice(0, S - 2 * BLOCK)),
        (slice(None), slice(None), slice(1, 3)),  # the middle heads (a partial check judges heads 0 and 3)
        (slice(1, 2),),  # batch 1 (a partial check judges batch 0)
    ],
    ids=["rows-0..S-129", "middle-heads", "batch-1"],
)
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_corrupt_output_fails(sampled, region, mode):
    case = Case(mode, "fp32", 2, 4, 2, S, S, 16, False)
    q, k, v, dout = inputs(case)
    verdict = verify(plus(region), q, k, v, dout, case)
    assert not verdict.ok and verdict.errors["out"] > verdict.allowed["out"]


@pytest.mark.parametrize("tensor", ["k", "v"])
def test_corrupt_middle_key_block_of_dk_dv_fails(sampled, tensor):
    case = Case("bwd", "fp32", 2, 4, 2, S, S, 16, False)
    q, k, v, dout = inputs(case)

    def fn(q, k, v):
        if tensor == "k":
            k = _CorruptGrad.apply(k, MIDDLE_KEYS, 0.5)
        else:
            v = _CorruptGrad.apply(v, MIDDLE_KEYS, 0.5)
        return right(False)(q, k, v)

    verdict = verify(fn, q, k, v, dout, case)
    name = "d" + tensor
    assert not verdict.ok and verdict.errors[name] > verdict.allowed[name]
    assert verdict.errors["out"] <= verdict.allowed["out"]


def test_second_call_not_bitwise_equal_fails(sampled):
    """One ulp in one element on the second call, at a row outside the judged blocks: far within tolerance,
    but not what the first call gave (the bitwise comparison covers the whole output)."""
    q, k, v, _ = inputs(B2)
    calls = []

    def fn(q, k, v):
        out = right(False)(q, k, v)
        calls.append(1)
        if len(calls) == 2:
            out = out.clone()
            out[1, 30, 2, 5] = torch.nextafter(out[1, 30, 2, 5], torch.tensor(math.inf))
        return out

    verdict = verify(fn, q, k, v, None, B2)
    assert len(calls) == 2
    assert not verdict.ok and verdict.errors["out_repeat"] > 0 and verdict.allowed["out_repeat"] == 0
    assert verdict.errors["out"] <= verdict.allowed["out"]
    assert verdict.summary().startswith("out_repeat")


def test_second_call_wrong_gradients_fail(sampled):
    """The output repeats bitwise but the second backward is wrong: both calls' gradients are judged."""
    case = Case("bwd", "fp32", 2, 4, 2, S, S, 16, False)
    q, k, v, dout = inputs(case)
    calls = []

    def fn(q, k, v):
        calls.append(1)
        if len(calls) == 2:
            q = _CorruptGrad.apply(q, range(S - 10, S), 0.5)
        return right(False)(q, k, v)

    verdict = verify(fn, q, k, v, dout, case)
    assert not verdict.ok and verdict.errors["dq"] > verdict.allowed["dq"] and verdict.errors["out_repeat"] == 0


def test_random_batch_is_judged_and_reported(sampled):
    case = Case("fwd", "fp32", 5, 2, 2, S, S, 16, False)
    q, k, v, _ = inputs(case)
    seed = next(s for s in range(50) if len(choose_sample(case, s).batches) == 3)
    middle = choose_sample(case, seed).batches[1]
    verdict = verify(plus((slice(middle, middle + 1),)), q, k, v, None, case, seed=seed)
    assert not verdict.ok and f"batches [0, {middle}, 4] of 5 (seed {seed})" in verdict.scope


@pytest.mark.parametrize("row,caught", [(0, True), (15, True), (16, False), (41, False), (42, True),
                                        (57, True), (58, False), (84, True), (99, True)])  # fmt: skip
def test_scope_names_exactly_the_judged_rows(sampled, row, caught):
    """The scope promises rows 0-15, 42-57 and 84-99: a corruption of a single row is caught exactly when the
    row is named there. (A sample is a sample: rows between the blocks are not judged.)"""
    q, k, v, _ = inputs(B2)
    verdict = verify(plus((slice(None), slice(row, row + 1))), q, k, v, None, B2)
    assert "query rows 0-15, 42-57, 84-99 of 100" in verdict.scope
    assert verdict.ok == (not caught)


# ---- the full check on small problems ----------------------------------------------------------------------
def test_full_check_judges_every_key_row():
    case = Case("bwd", "fp32", 2, 4, 2, 40, 37, 16, True)
    q, k, v, dout = inputs(case)
    assert verify(right(True), q, k, v, dout, case).ok

    def fn(q, k, v):
        return right(True)(q, _CorruptGrad.apply(k, [20], 0.5), v)

    verdict = verify(fn, q, k, v, dout, case)
    assert not verdict.ok and verdict.scope.startswith("all of out, dq, dk, dv")


# ---- bitwise comparison ------------------------------------------------------------------------------------
def test_repeat_error():
    a = torch.tensor([1.0, 0.0, math.nan], dtype=torch.bfloat16)
    assert repeat_error(a, a.clone()) == 0.0  # the same NaN bits are equal bits
    assert repeat_error(a, torch.tensor([1.0, -0.0, math.nan], dtype=torch.bfloat16)) == math.ulp(0.0)
    assert repeat_error(a, torch.tensor([1.0, 0.0, 2.0], dtype=torch.bfloat16)) == math.inf
    assert repeat_error(a, torch.tensor([1.5, 0.0, math.nan], dtype=torch.bfloat16)) == 0.5
    assert repeat_error(a, a.float()) == math.inf  # another dtype is not the same output


# ---- on the GPU: time and memory at 16k tokens ---------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads_q,heads_k,head_dim", [(16, 16, 128), (32, 4, 64), (8, 1, 256)])
def test_sampled_check_at_16k_on_gpu(heads_q, heads_k, head_dim):
    """The default grid's largest training case (batch 1, 16k tokens): a right provider (SDPA) passes, the float64
    recomputation stays within CHUNK_BYTES of temporaries, and the whole check takes seconds."""
    import time

    import torch.nn.functional as F

    case = Case("bwd", "bf16", 1, heads_q, heads_k, 16384, 16384, head_dim, True)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_k = (1, 16384, heads_q, head_dim), (1, 16384, heads_k, head_dim)
    q, k, v, dout = (
        torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in (shape_q, shape_k, shape_k, shape_q)
    )

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=heads_q != heads_k
        )
        return out.transpose(1, 2)

    sample = choose_sample(case)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    recompute(q, k, v, dout, case, sample, torch.float64)
    torch.cuda.synchronize()
    exact_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    start = time.perf_counter()
    verdict = verify(sdpa, q, k, v, dout, case)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    print(f"{case.label()}: float64 recompute {exact_s:.2f} s, peak {peak / 2**20:.0f} MiB")
    print(f"verify {total_s:.2f} s: {verdict.summary()}")
    assert verdict.ok, verdict.summary()
    assert peak <= correctness.CHUNK_BYTES + (64 << 20)
    assert total_s < 30
