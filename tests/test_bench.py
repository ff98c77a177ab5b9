"""``attnkit bench`` on CPU: FLOP formulas, the timing helper, n/a decisions, correctness verdicts, and the CLI
end to end in quick mode (JSON, CSV, Markdown and, with matplotlib, PNGs)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch
from helpers import plain_attention

from attnkit.bench import cases as bc
from attnkit.bench import peers
from attnkit.bench.cases import Case, case_flops, forward_flops, kv_bytes
from attnkit.bench.correctness import verify
from attnkit.bench.peers import FlashAttnProvider, FlexProvider, SdpaProvider, math_bytes
from attnkit.bench.providers import DeviceInfo, Kernel, NotApplicable, Provider, all_providers, resolve_names
from attnkit.bench.runner import BenchConfig, run_bench
from attnkit.bench.timing import measure, measure_interleaved, rotation_count
from attnkit.cli import main as cli_main

CPU = torch.device("cpu")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def dense(mode="fwd", s=64, d=32, causal=False, b=2, h=2, dtype="fp32") -> Case:
    return Case(mode, dtype, b, h, h, s, s, d, causal)


# ---- FLOPs and bytes ------------------------------------------------------------------------------------------
def test_forward_flops_formula():
    assert forward_flops(2, 16, 1024, 1024, 64, False) == 4 * 2 * 16 * 1024 * 1024 * 64
    assert forward_flops(2, 16, 1024, 1024, 64, True) == 2 * 2 * 16 * 1024 * 1024 * 64


@pytest.mark.parametrize("causal", [False, True])
def test_mode_flops_factors(causal):
    fwd = case_flops(dense("fwd", causal=causal))
    assert case_flops(dense("bwd", causal=causal)) == pytest.approx(2.5 * fwd)
    assert case_flops(dense("fwdbwd", causal=causal)) == pytest.approx(3.5 * fwd)


def test_decode_bytes_and_flops():
    case = Case("decode", "bf16", 4, 32, 8, 1, 4096, 128, False)
    assert kv_bytes(case) == 2 * 4 * 4096 * 8 * 128 * 2  # K and V, bf16, only the 8 KV heads
    assert case_flops(case) == 4 * 4 * 32 * 1 * 4096 * 128


def test_default_grid_is_flash_attn_grid():
    cases = bc.build_cases(bc.Grid(modes=("fwd",)))
    assert len(cases) == 3 * 2 * 6
    for c in cases:
        assert c.batch == 16384 // c.seqlen_q and c.heads_q == 2048 // c.head_dim and c.dtype == "bf16"
    decode = bc.build_cases(bc.Grid(modes=("decode",)))
    assert [c.seqlen_k for c in decode] == [1024 * 2**i for i in range(8)]
    assert all((c.heads_q, c.heads_k, c.head_dim, c.seqlen_q) == (32, 8, 128, 1) for c in decode)


def test_parsers():
    assert bc.parse_ints("512, 1k,16K", "x") == (512, 1024, 16384)
    assert bc.parse_modes(["fwd,bwd", "fwd", "decode"]) == ("fwd", "bwd", "decode")
    with pytest.raises(ValueError, match="unknown mode"):
        bc.parse_modes(["sideways"])
    with pytest.raises(ValueError, match="not an integer"):
        bc.parse_ints("abc", "--dims")


# ---- timing ---------------------------------------------------------------------------------------------------
class FakeClock:
    """Each call to the step advances time by the duration the test scripts for it."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = iter(durations)

    def mark(self):
        return self.now

    def elapsed_ms(self, start, end):
        return end - start

    def synchronize(self):
        pass

    def run(self):
        self.now += next(self.durations)


def test_measure_median_and_rotation():
    # warm-up (2) and estimate (1) calls are not in the median; the estimate (10 ms) with a 50 ms budget gives
    # 5 repeats, whose median is 3.
    clock = FakeClock([100.0, 100.0, 10.0, 5.0, 1.0, 3.0, 2.0, 4.0])
    seen = []

    def step(i):
        seen.append(i)
        clock.run()

    t = measure(step, rotations=3, clock=clock, warmup=2, min_repeats=5, max_repeats=100, budget_s=0.05)
    assert t.repeats == 5 and t.rotations == 3
    assert t.median_ms == 3.0 and t.min_ms == 1.0 and t.max_ms == 5.0
    assert seen == [0, 1, 2, 0, 1, 2, 0, 1]  # consecutive calls never reuse the same buffers


def test_measure_repeats_clamped():
    clock = FakeClock([1.0] * 50)
    t = measure(lambda i: clock.run(), 1, clock, warmup=1, min_repeats=3, max_repeats=7, budget_s=10.0)
    assert t.repeats == 7


def test_measure_interleaved_times_in_rounds_and_drops_failures():
    """Implementations of one case are timed one call each per round, so clock changes under sustained load hit
    them alike; each keeps its own repeat count and rotation, and one that raises is reported, not timed again."""
    clock = FakeClock([])
    order = []

    def step(name, ms, fail_on=None):
        def run(i):
            order.append((name, i))
            if len([n for n, _ in order if n == name]) == fail_on:
                raise RuntimeError(f"{name} broke")
            clock.now += ms

        return run

    steps = {"slow": step("slow", 10.0), "fast": step("fast", 1.0), "flaky": step("flaky", 2.0, fail_on=4)}
    got = measure_interleaved(steps, 2, clock, warmup=1, min_repeats=2, max_repeats=4, budget_s=0.03)
    assert (got["slow"].repeats, got["fast"].repeats) == (3, 4)  # 30 ms / 10 ms; 30 ms / 1 ms capped at 4
    assert got["slow"].median_ms == 10.0 and got["fast"].median_ms == 1.0 and got["fast"].rotations == 2
    assert isinstance(got["flaky"], RuntimeError) and "flaky broke" in str(got["flaky"])
    timed = order[6:]  # after warm-up + estimate (2 calls) of each, in turn
    assert [n for n, _ in timed] == ["slow", "fast", "flaky", "slow", "fast", "flaky", "slow", "fast", "fast"]
    assert [i for n, i in order if n == "fast"] == [0, 1, 0, 1, 0, 1]  # rotation continues across rounds


def test_rotation_count():
    assert rotation_count(10, 100) == 8  # capped
    assert rotation_count(30, 100) == 4
    assert rotation_count(500, 100) == 1  # already larger than the caches


# ---- n/a decisions --------------------------------------------------------------------------------------------
def test_sdpa_math_skipped_by_memory_estimate():
    info = DeviceInfo(CPU, free_bytes=40 * 2**30)
    big = Case("fwd", "bf16", 1, 16, 16, 16384, 16384, 128, False)
    assert math_bytes(big) == 4 * 16 * 16384**2 * 4  # fp32 scores, whatever the input dtype
    reason = SdpaProvider("math").na_reason(big, info)
    assert reason is not None and "GiB" in reason
    assert SdpaProvider("math").na_reason(dense(), info) is None
    # backward keeps score-sized buffers per rotated input set
    assert math_bytes(dense("bwd"), rotations=3) > math_bytes(dense("bwd"), rotations=1)


def test_sdpa_causal_misaligned_is_na():
    case = Case("fwd", "fp32", 1, 2, 2, 32, 64, 32, True)
    assert "bottom-right" in SdpaProvider("flash").na_reason(case, DeviceInfo(CPU, 2**40))


def test_flash_attn_needs_cuda_and_half():
    p = FlashAttnProvider("flash_attn", "flash_attn")
    assert "CUDA" in p.na_reason(dense(), DeviceInfo(CPU, 2**40))
    assert "fp16/bf16" in p.na_reason(dense(), DeviceInfo(torch.device("cuda"), 2**40))
    if importlib.util.find_spec("flash_attn") is None:
        assert "not installed" in p.unavailable()


def test_flex_compile_budget():
    p = FlexProvider(compile_budget_s=1.0)
    info = DeviceInfo(CPU, 2**40)
    assert p.na_reason(dense(), info) is None
    p.compile_seconds = 5.0
    assert "compile budget" in p.na_reason(dense(s=128), info)


def test_resolve_names():
    providers = all_providers()
    assert resolve_names(["default"], providers, CPU) == ["attnkit:reference", "sdpa:math"]
    assert resolve_names(["reference", "sdpa"], providers, CPU)[:2] == ["attnkit:reference", "sdpa:flash"]
    with pytest.raises(ValueError, match="unknown provider"):
        resolve_names(["nope"], providers, CPU)


# ---- correctness and the loop ---------------------------------------------------------------------------------
def _inputs(case):
    g = torch.Generator().manual_seed(0)
    shape_q = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    shape_k = (case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    return [torch.randn(s, generator=g) for s in (shape_q, shape_k, shape_k, shape_q)]


def _right(causal):
    def fn(q, k, v):
        return plain_attention(q, k, v, causal)

    return fn


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_verify_accepts_right_and_rejects_wrong(mode, causal):
    case = Case(mode, "fp32", 2, 4, 2, 40, 40, 16, causal)
    q, k, v, dout = _inputs(case)
    assert verify(_right(causal), q, k, v, dout, case).ok
    bad = verify(lambda q, k, v: _right(causal)(q, k, v) * 1.01, q, k, v, dout, case)
    assert not bad.ok and "max error" in bad.summary()
    nan = verify(lambda q, k, v: _right(causal)(q, k, v) * math.nan, q, k, v, dout, case)
    assert not nan.ok


def test_verify_slice_of_large_case():
    case = Case("fwd", "fp32", 1, 2, 2, 2100, 2100, 8, True)  # above the full-check size: a sample only
    q, k, v, _ = _inputs(case)
    verdict = verify(_right(True), q, k, v, None, case)
    assert verdict.ok and "all 2 query heads at query rows 0-63, 1018-1081, 2036-2099 of 2100" in verdict.scope


class Scripted(Provider):
    def __init__(self, name, fn=None, exc=None, na=None):
        self.name, self.fn, self.exc, self.na = name, fn, exc, na

    def na_reason(self, case, info):
        return self.na

    def build(self, case, device):
        if self.exc:
            raise self.exc
        return Kernel(self.fn)


def test_loop_records_every_outcome():
    providers = {
        "good": Scripted("good", fn=_right(False)),
        "wrong": Scripted("wrong", fn=lambda q, k, v: _right(False)(q, k, v) + 0.5),
        "boom": Scripted("boom", exc=RuntimeError("kernel exploded\nsecond line")),
        "na": Scripted("na", na="not for this case"),
        "na-late": Scripted("na-late", exc=NotApplicable("found out late")),
    }
    config = BenchConfig([dense("fwd"), dense("bwd")], providers, CPU, case_time_s=0.001, min_repeats=2, warmup=1)
    result = run_bench(config)
    by = {(r.case.mode, r.provider): r for r in result.records}
    assert len(result.records) == 10
    for mode in ("fwd", "bwd"):
        assert by[mode, "good"].status == "ok" and by[mode, "good"].tflops > 0
        assert by[mode, "wrong"].status == "WRONG" and by[mode, "wrong"].ms is None  # never timed
        assert by[mode, "boom"].status == "error" and "kernel exploded" in by[mode, "boom"].reason
        assert "second line" not in by[mode, "boom"].reason
        assert (by[mode, "na"].status, by[mode, "na"].reason) == ("n/a", "not for this case")
        assert (by[mode, "na-late"].status, by[mode, "na-late"].reason) == ("n/a", "found out late")


@pytest.mark.parametrize(
    "case",
    [
        Case("decode", "fp32", 2, 8, 2, 1, 64, 16, False),  # small: the whole output is checked
        Case("decode", "fp32", 1, 8, 2, 1, 70000, 16, False),  # long K/V: judged per KV head, never expanded
        Case("bwd", "fp32", 2, 4, 2, 40, 40, 16, True),  # gradients: dk and dv reach the case's 2 KV heads
    ],
    ids=["decode-full", "decode-long-kv", "bwd-gqa"],
)
def test_sdpa_without_gqa_kernel_repeats_kv_and_passes(monkeypatch, case):
    """The path sdpa:efficient takes on a GPU (no GQA kernel, so K/V are repeated per query head by
    Kernel.prepare before timing), taken here by SDPA-math on CPU: its output is right and must be judged so.
    The H200 run of 2026-11-22 flagged it WRONG because the check compared query head h with *prepared* KV
    head h // group, i.e. original KV head h // group**2."""
    real_probe = peers._probe

    def probe_without_gqa(fn, case, device, repeat=False):
        return real_probe(fn, case, device, repeat) if repeat else "no GQA kernel in this test"

    monkeypatch.setattr(peers, "_probe", probe_without_gqa)
    config = BenchConfig([case], {"sdpa:math": SdpaProvider("math")}, CPU, case_time_s=0.001, min_repeats=2,
                         max_repeats=2, warmup=0)  # fmt: skip
    (record,) = run_bench(config).records
    assert f"K/V repeated {case.heads_q // case.heads_k}x" in record.note
    assert record.status == "ok", record.reason
    assert set(record.errors) == {"out", "out_repeat"} | ({"dq", "dk", "dv"} if case.needs_grad else set())


def test_verify_rejects_inputs_that_do_not_match_the_case():
    case = Case("decode", "fp32", 1, 4, 2, 1, 16, 8, False)
    q, k, v, _ = _inputs(case)
    with pytest.raises(ValueError, match=r"k has shape \(1, 16, 4, 8\), expected \(1, 16, 2, 8\)"):
        verify(_right(False), q, k.repeat_interleave(2, 2), v, None, case)


# ---- the command line, end to end -----------------------------------------------------------------------------
def test_cli_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli_main(["bench", "--quick", "--mode", "fwd,bwd", "--mode", "fwdbwd,decode,memory", "--dims", "32",
                   "--out", str(out), "--progress", "plain", "--case-time", "0.005"])  # fmt: skip
    assert rc == 0
    assert "results in" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["torch"] == torch.__version__ and doc["meta"]["date_utc"].endswith("Z")
    assert doc["config"]["providers"] == ["attnkit:reference", "sdpa:math"]
    results = doc["results"]
    modes = {r["mode"] for r in results}
    assert modes == {"fwd", "bwd", "fwdbwd", "decode", "memory"}
    # 4 cases per dense mode (2 seqlens x causal both), 2 decode, 3 memory; 2 providers each
    assert len(results) == 2 * (3 * 4 + 2 + 3)
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"]
    for r in results:
        if r["mode"] == "memory":
            assert r["ms"] is None  # memory mode measures memory only
        else:
            assert r["ms"] > 0 and r["tflops"] > 0 and r["repeats"] >= 3
    assert all(r["gbps"] > 0 for r in results if r["mode"] == "decode")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) and {"provider", "tflops", "gbps", "peak_mib", "status"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert "| seqlen | batch x heads | `attnkit:reference` | `sdpa:math` |" in md
    assert "## fwd, fp32, head dim 32, causal: TFLOP/s" in md and "## decode, fp32" in md
    if HAVE_MPL:
        for name in ("fwd", "bwd", "fwdbwd", "decode"):
            assert (out / f"{name}.png").stat().st_size > 1000
        assert doc["config"]["plots"]
        # figures can be redrawn from the JSON alone
        redraw = tmp_path / "redraw"
        assert cli_main(["bench", "--plot-from", str(out / "results.json"), "--out", str(redraw)]) == 0
        assert (redraw / "fwd.png").exists()
    else:
        assert any("matplotlib" in n for n in doc["notes"])


def test_cli_time_budget_and_na(tmp_path):
    out = tmp_path / "b"
    rc = cli_main(["bench", "--quick", "--mode", "fwd", "--dims", "32", "--seqlens", "64", "--causal", "false",
                   "--providers", "reference,sdpa:cudnn,flash_attn", "--out", str(out), "--no-plots",
                   "--progress", "plain", "--case-time", "0.005"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    status = {r["provider"]: r["status"] for r in doc["results"]}
    assert status["attnkit:reference"] == "ok"
    if not torch.cuda.is_available():
        assert status["sdpa:cudnn"] == "n/a"
    md = (out / "results.md").read_text()
    assert "n/a [1]" in md and "Why some cells have no number" in md
    assert not list(out.glob("*.png"))

    out2 = tmp_path / "c"
    rc = cli_main(["bench", "--quick", "--mode", "fwd", "--out", str(out2), "--no-plots", "--time-budget", "0",
                   "--progress", "plain"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out2 / "results.json").read_text())
    assert doc["results"] == [] and "time budget" in doc["notes"][0]
    assert "time budget" in (out2 / "results.md").read_text()
