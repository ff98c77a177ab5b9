"""The differential fuzzer (attnkit.fuzz) on the CPU: it passes on the shipped backends, and it catches planted
bugs of the kinds that slipped through before (a wrong middle row block, a NaN leak from padding, a wrong cache
write, a second call that differs), each with a seed that replays the failing case."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnkit import fuzz
from attnkit.registry import REGISTRY

CPU = torch.device("cpu")
# Also used by tests/triton/test_triton_fuzz.py.
LIMITS = fuzz.Limits(max_seqlen=40, max_batch=2, max_heads_q=4, max_scores=2**12, max_head_dim=48)


def test_cases_are_a_function_of_the_seed():
    for seed in range(50):
        assert fuzz.draw_case(seed, LIMITS) == fuzz.draw_case(seed, LIMITS)
    cases = [fuzz.draw_case(seed, LIMITS) for seed in range(300)]
    assert {c.op for c in cases} == set(fuzz.OPS)
    assert {c.dtype for c in cases} == {torch.float16, torch.bfloat16, torch.float32}
    assert any(c.causal for c in cases) and any(c.window != (-1, -1) for c in cases)
    assert any(c.dropout_p for c in cases) and any(c.deterministic for c in cases) and any(c.alibi for c in cases)
    assert any(c.seqlen_q != c.seqlen_k for c in cases) and any(c.heads_q != c.heads_k for c in cases)
    assert any(c.page_size for c in cases) and any(0 in c.cache_lens for c in cases)
    for c in cases:
        assert c.batch * c.heads_q * c.seqlen_q * c.seqlen_k <= LIMITS.max_scores
        if c.op == "kvcache":
            assert all(n + c.new_len <= c.capacity for n in c.cache_lens)


def test_reference_passes():
    summary = fuzz.fuzz(600, device=CPU, backends=["reference"], first_seed=7, max_cases=25, limits=LIMITS)
    assert summary.cases == 25 and not summary.failures, summary.format()
    assert sum(s["pass"] for s in summary.counts.values()) >= 20


def test_progress_tallies_are_logged():
    """A worker's running tally every progress_every cases: what a run killed by a timeout still leaves."""
    lines: list[str] = []
    summary = fuzz.fuzz(600, device=CPU, backends=["reference"], first_seed=7, max_cases=7, limits=LIMITS,
                        log=lines.append, progress_every=3)  # fmt: skip
    tallies = [line for line in lines if " so far " in line]
    assert len(tallies) == 2 and tallies[0].startswith("worker 0 so far (last seed 9): 3 cases;"), lines
    assert tallies[1].split(": ", 1)[1].startswith("6 cases;")
    assert summary.tally() == summary.format().splitlines()[-1]


class _Planted:
    """Wraps the reference backend's forward and breaks its output in one way."""

    def __init__(self, monkeypatch, how: str):
        backend = REGISTRY.get("reference")
        original = backend.forward
        calls = {"n": 0}

        def forward(q, k, v, alibi, params, varlen):
            out, lse = original(q, k, v, alibi, params, varlen)
            calls["n"] += 1
            if how == "middle_rows" and out.dim() == 4 and out.shape[1] >= 3:
                out = out.clone()
                out[:, out.shape[1] // 2] += 0.5
            elif how == "last_batch" and out.dim() == 4 and out.shape[0] >= 2:
                out = out.clone()
                out[-1] *= 1.1
            elif how == "second_call" and calls["n"] % 2 == 0:
                out = out.clone()
                out.view(-1)[0] += 1e-3
            elif how == "nan_padding" and out.dim() == 3:
                out = out + 0 * q[: out.shape[0], :, : out.shape[-1]].sum()  # NaN padding rows leak everywhere
            return out, lse

        monkeypatch.setattr(backend, "forward", forward)


@pytest.mark.parametrize(
    "how,ops", [("middle_rows", ["attention"]), ("last_batch", ["attention"]), ("second_call", ["attention"]),
                ("nan_padding", ["varlen"])],
)  # fmt: skip
def test_planted_bugs_are_caught_with_a_replayable_seed(monkeypatch, how, ops):
    _Planted(monkeypatch, how)
    summary = fuzz.fuzz(600, device=CPU, backends=["reference"], first_seed=11, max_cases=12, limits=LIMITS, ops=ops)
    assert summary.failures, f"planted bug {how!r} not caught:\n{summary.format()}"
    seed, description, outcome = summary.failures[0]
    assert outcome.backend == "reference" and outcome.details
    replayed = fuzz.run_case(fuzz.draw_case(seed, LIMITS, ops), ["reference"], CPU)
    assert replayed[0].status == "FAIL" and fuzz.draw_case(seed, LIMITS, ops).describe() == description


def test_a_wrong_cache_write_is_caught(monkeypatch):
    backend = REGISTRY.get("reference")
    original = backend.forward_kvcache

    def forward_kvcache(q, k_cache, v_cache, *args, **kwargs):
        result = original(q, k_cache, v_cache, *args, **kwargs)
        k_cache.view(-1)[-1] = 0.0  # a stray write into the last slot of the cache
        return result

    monkeypatch.setattr(backend, "forward_kvcache", forward_kvcache)
    summary = fuzz.fuzz(600, device=CPU, backends=["reference"], first_seed=3, max_cases=10, limits=LIMITS,
                        ops=["kvcache"])  # fmt: skip
    assert any("k_cache" in d for _, _, o in summary.failures for d in o.details), summary.format()


def test_a_declining_backend_is_not_a_failure():
    case = dataclasses.replace(fuzz.draw_case(5, LIMITS, ["attention"]), dtype=torch.float32)
    outcomes = fuzz.run_case(case, ["cupy_cuda"], CPU)
    assert [o.status for o in outcomes] == ["n/a"]


def test_cli_replay(capsys):
    from attnkit.cli import main

    assert main(["check", "--device", "cpu", "--backend", "reference", "--fuzz-replay", "4"]) == 0
    out = capsys.readouterr().out
    assert "seed 4:" in out and "reference: pass" in out


def test_check_reports_a_crashing_backend_as_a_failure(monkeypatch):
    """attnkit check goes on past a backend that accepts a case and then raises something other than an attnkit
    error (seen on the H200: a backward that died in autograd), and counts it as FAIL."""
    from attnkit import check

    backend = REGISTRY.get("reference")

    def broken(*args, **kwargs):
        raise RuntimeError("element 0 of tensors does not require grad")

    monkeypatch.setattr(backend, "forward", broken)
    case = check.default_cases(CPU, large=False)[0]
    row = check.check_case("reference", case, torch.float32, CPU)
    assert row.status.startswith("FAIL") and "RuntimeError" in row.status
    assert "1 failed" in check.format_rows([row])


# ---- fp8 cases (attnkit.fuzz_fp8) -------------------------------------------------------------------------------


def _fp8_seeds(ops=fuzz.OPS, count=12):
    return [s for s in range(400) if fuzz.draw_case(s, LIMITS, ops, fp8=True).fp8][:count]


def test_fp8_cases_are_drawn_only_for_backends_that_take_them():
    """fp8 cases come from a generator of their own: with fp8 allowed a seed's case is the same but for the fp8
    fields (and the options fp8 refuses), and fp8 cases exist for every operator."""
    assert fuzz.draws_fp8(["reference"]) and fuzz.draws_fp8(["cupy_cuda"]) and not fuzz.draws_fp8(["torch_sdpa"])
    cases = [(fuzz.draw_case(s, LIMITS), fuzz.draw_case(s, LIMITS, fp8=True)) for s in range(300)]
    assert not any(plain.fp8 for plain, _ in cases)
    drawn = [c for _, c in cases if c.fp8]
    assert {c.op for c in drawn} == set(fuzz.OPS) and 20 <= len(drawn) <= 80
    assert any(c.fp8_flip_q for c in drawn) and not any(c.sink or c.dropout_p for c in drawn)
    for plain, with_fp8 in cases:
        if not with_fp8.fp8:
            assert with_fp8 == plain
        else:
            undone = dataclasses.replace(with_fp8, fp8=False, fp8_flip_q=False, sink=plain.sink,
                                         dropout_p=plain.dropout_p, deterministic=plain.deterministic)  # fmt: skip
            assert undone == plain


def test_reference_passes_fp8_cases():
    seeds = _fp8_seeds()
    for seed in seeds:
        case = fuzz.draw_case(seed, LIMITS, fp8=True)
        (outcome,) = fuzz.run_case(case, ["reference"], CPU)
        assert outcome.status == "pass" and outcome.op == f"{case.op}/fp8", (case.describe(), outcome.details)
    # A backend without fp8 is not eligible for them.
    assert [o.status for o in fuzz.run_case(fuzz.draw_case(seeds[0], LIMITS, fp8=True), ["torch_sdpa"], CPU)] == ["n/a"]


@pytest.mark.parametrize("how", ["scale", "descale_row", "cache_write"])
def test_planted_fp8_bugs_are_caught(monkeypatch, how):
    """An fp8 output off by 3% (the bound of docs/fp8.md is tight enough for it), a descale applied to the wrong
    batch row, and a stray write into an fp8 cache are all caught on fp8 cases, and replayed from their seed."""
    backend = REGISTRY.get("reference")
    forward, forward_kvcache = backend.forward_fp8, backend.forward_kvcache_fp8

    def planted_forward(q, k, v, alibi, params, varlen, scales):
        if how == "descale_row" and scales.v_descale.shape[0] > 1:
            scales = dataclasses.replace(scales, v_descale=scales.v_descale.flip(0))
        out, lse = forward(q, k, v, alibi, params, varlen, scales)
        return (out * 1.03 if how == "scale" else out), lse

    def planted_kvcache(q, k_cache, v_cache, cache, alibi, params, scales):
        result = forward_kvcache(q, k_cache, v_cache, cache, alibi, params, scales)
        if how == "cache_write":
            k_cache.view(-1)[0] = 0.0
        return result

    monkeypatch.setattr(backend, "forward_fp8", planted_forward)
    monkeypatch.setattr(backend, "forward_kvcache_fp8", planted_kvcache)
    ops = ["kvcache"] if how == "cache_write" else ["attention", "varlen"]
    failing = []
    for seed in _fp8_seeds(ops, count=10):
        case = fuzz.draw_case(seed, LIMITS, ops, fp8=True)
        if how == "descale_row" and case.batch < 2:
            continue
        (outcome,) = fuzz.run_case(case, ["reference"], CPU)
        if outcome.status == "FAIL":
            failing.append((seed, outcome))
    assert failing, f"planted fp8 bug {how!r} not caught"
    seed, outcome = failing[0]
    assert outcome.details
    assert fuzz.run_case(fuzz.draw_case(seed, LIMITS, ops, fp8=True), ["reference"], CPU)[0].status == "FAIL"


def test_fp8_lse_is_judged_against_plain_bf16():
    """fp8 calls' lse: within 2x the plain bfloat16 computation's error + 1e-4 (docs/fp8.md), not the 1e-4-relative
    rule of 16-bit calls; the -inf pattern must still match."""
    from attnkit.fuzz import _Judge

    exact = torch.tensor([[1.0, 2.0, float("-inf")]], dtype=torch.float64)
    plain = exact + torch.tensor([[0.0, 3e-3, 0.0]], dtype=torch.float64)
    fast = exact + torch.tensor([[-5e-3, 0.0, 0.0]], dtype=torch.float64)
    strict = _Judge(torch.bfloat16, "x")
    strict.lse(fast, exact)
    assert strict.failures and "lse: max error" in strict.failures[0]
    fp8_judge = _Judge(torch.bfloat16, "x")
    fp8_judge.lse(fast, exact, plain)
    assert fp8_judge.failures == []
    too_far = _Judge(torch.bfloat16, "x")
    too_far.lse(exact + torch.tensor([[7e-3, 0.0, 0.0]], dtype=torch.float64), exact, plain)
    assert too_far.failures and "allowed 0.0061" in too_far.failures[0]
    pattern = _Judge(torch.bfloat16, "x")
    pattern.lse(torch.zeros(1, 3, dtype=torch.float64), exact, plain)
    assert pattern.failures == ["lse: -inf/NaN pattern differs from the exact answer"]


ONE_KEY_DROPOUT = fuzz.Case(
    seed=646415205, op="attention", dtype=torch.bfloat16, batch=4, seqlen_q=279, seqlen_k=1, heads_q=3, heads_k=3,
    head_dim=24, head_dim_v=24, dropout_p=0.3, deterministic=True,
)  # fmt: skip


def test_one_key_rows_allow_the_rounding_of_the_stored_output(monkeypatch):
    """Found by the GPU fuzzer (H200, 2026-12-02): rows that see one key with dropout, bf16. dS = P (dP - delta)
    cancels exactly, so the backward's error is the rounding of the stored output inside delta, which plain
    PyTorch never forms; the reference and triton_cuda backends failed alike (dk 0.087 > 0.01). The judge allows
    that rounding per element (fuzz._delta_slack: here 0.19-0.37 at dk, 6 standard deviations, up to 0.11 at dq)
    and still catches an error past it, in dk as in dv (which has no such term)."""
    assert fuzz.run_case(ONE_KEY_DROPOUT, ["reference"], CPU)[0].status == "pass"
    backend = REGISTRY.get("reference")
    original = backend.backward

    for name, index, error in (("dk", 1, 0.5), ("dv", 2, 0.5)):

        def backward(*args, index=index, error=error):
            grads = list(original(*args))
            grads[index] = grads[index].clone()
            grads[index].view(-1)[0] += error
            return tuple(grads)

        monkeypatch.setattr(backend, "backward", backward)
        outcome = fuzz.run_case(ONE_KEY_DROPOUT, ["reference"], CPU)[0]
        assert outcome.status == "FAIL" and [d.split(":")[0] for d in outcome.details] == [name], outcome


def test_a_lost_cuda_context_stops_the_worker_with_its_summary(monkeypatch):
    """After a fault (an illegal address) every later CUDA call of the process fails: the worker stops at the
    case after which the context was gone, names its seed, and keeps the counts it has, instead of failing every
    later case or dying without a summary (faked here: this machine has no GPU)."""
    import torch

    from attnkit import fuzz

    monkeypatch.setattr(fuzz, "run_case", lambda case, names, device: [])
    syncs = []

    def synchronize(device=None):
        syncs.append(device)
        if len(syncs) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    lines = []
    summary = fuzz.fuzz(60, device=torch.device("cuda"), backends=["reference"], first_seed=10, max_cases=5,
                        limits=fuzz.Limits(), worker=1, workers=3, log=lines.append)  # fmt: skip
    assert summary.cases == 2 and summary.lost_at == [14]
    assert lines == ["STOP worker 1: the CUDA context is lost after seed 14; replay it alone"]
    assert "lost after seed(s) 14" in summary.format()
    merged = fuzz.Summary()
    merged.merge(summary)
    assert merged.lost_at == [14]


def test_float32_one_key_gradients_allow_the_products_rounding():
    """Found by the GPU fuzzer (H100, 2026-12-06, seed 407906485): float32 varlen, a key that 2048 query rows see
    alone (head dim 224), triton_cuda's dk 2.0e-4 > 1.4e-4. There dS = dP - delta cancels, and what is left is the
    float32 rounding of the two head-dim dots, which plain PyTorch (whose softmax backward cancels exactly) never
    forms, summed over the rows. Here the fused order of operations is emulated in float32: dP = dout . v and
    delta = dout . out with out = v (one key). Its dk error exceeds the float32 floor, and the judge's per-element
    slack (fuzz._delta_slack) covers it. An error past that slack is still caught."""
    from attnkit.fuzz import _Judge
    from attnkit.testing import max_abs_error

    gen = torch.Generator().manual_seed(7)
    rows, group, d, scale = 4096, 2, 224, 0.176
    q = torch.randn(rows, group, d, generator=gen)
    k = torch.randn(1, 1, d, generator=gen)
    v = torch.randn(1, 1, d, generator=gen)
    dout = torch.randn(rows, group, d, generator=gen)

    def fused_dk(dt: torch.dtype) -> torch.Tensor:
        v_rows = v.to(dt).expand(rows, group, d)  # out = v: the one key has probability 1
        dp = torch.einsum("ihd,hd->ih", dout.to(dt), v[0].to(dt).expand(group, d))
        delta = (dout.to(dt) * v_rows).sum(-1)
        ds = dp - delta
        return scale * torch.einsum("ih,ihd->d", ds, q.to(dt))[None, None]

    fast, exact = fused_dk(torch.float32), torch.zeros(1, 1, d, dtype=torch.float64)
    plain = torch.zeros(1, 1, d)  # autograd's softmax backward cancels exactly at one key
    assert max_abs_error(fused_dk(torch.float64), exact) < 1e-12
    assert max_abs_error(fast, exact) > fuzz.GRAD_ATOL[torch.float32]
    probs = torch.ones(1, rows, group, 1, dtype=torch.float64)
    out = v.double().expand(rows, group, d)
    _, slack_dk = fuzz._delta_slack(probs, q[None], k[None], out[None], dout[None], scale, torch.float32)
    without = _Judge(torch.float32, "x")
    without.rule("dk", fast, exact, plain, 3.0)
    assert without.failures
    judged = _Judge(torch.float32, "x")
    judged.rule("dk", fast, exact, plain, 3.0, slack=slack_dk[0])
    assert judged.failures == []
    past = fast.clone()
    past[0, 0, 5] += float(slack_dk[0][0, 0, 5]) + 2 * fuzz.GRAD_ATOL[torch.float32]
    caught = _Judge(torch.float32, "x")
    caught.rule("dk", past, exact, plain, 3.0, slack=slack_dk[0])
    assert caught.failures and caught.failures[0].startswith("dk: max error")
