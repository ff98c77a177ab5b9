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
