"""``attnkit bench`` memory mode on CPU: the O(seqlen) target's budget (q, k, v, out, dout, dq, dk, dv and the
float32 lse), the ratio and pass/fail next to each measured peak, the 32k case the target is stated at, and what
the peak is measured from. CPU keeps no allocator peak, so measured peaks are scripted here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnkit.bench import cases as bc
from attnkit.bench import runner
from attnkit.bench.cases import MEMORY_TARGET, Case, memory_budget
from attnkit.bench.peers import SdpaProvider, math_bytes
from attnkit.bench.providers import DeviceInfo, Kernel, Provider
from attnkit.bench.report import markdown
from attnkit.bench.runner import BenchConfig, Record, run_bench
from attnkit.cli import build_parser

CPU = torch.device("cpu")
MIB = 2**20
# The target's shape: B=1, H=16, D=128, S=32k, bf16 -> every (B, S, H, D) tensor is 128 MiB, the lse 2 MiB.
TARGET_CASE = Case("memory", "bf16", 1, 16, 16, 32768, 32768, 128, False)


def test_budget_of_the_target_case():
    budget = memory_budget(TARGET_CASE)
    assert budget.before == 4 * 128 * MIB  # q, k, v, dout: allocated before the measurement
    assert budget.during == 4 * 128 * MIB + 2 * MIB  # out, dq, dk, dv and the float32 lse: inside it
    assert budget.total == 1026 * MIB
    # Only what the step allocates is in "peak extra"; the ratio puts the inputs back on the measured side.
    assert budget.ratio(514 * MIB) == pytest.approx(1.0)
    assert budget.max_peak_extra() == pytest.approx(1.10 * 1026 * MIB - 512 * MIB)
    assert budget.ratio(budget.max_peak_extra()) == pytest.approx(MEMORY_TARGET)


def test_budget_counts_gqa_kv_heads_and_needs_a_backward():
    budget = memory_budget(Case("bwd", "fp16", 2, 8, 2, 64, 128, 32, True))
    q, kv, lse = 2 * 64 * 8 * 32 * 2, 2 * 128 * 2 * 32 * 2, 2 * 8 * 64 * 4
    assert (budget.before, budget.during) == (2 * q + 2 * kv, 2 * q + 2 * kv + lse)
    with pytest.raises(ValueError, match=r"case\.mode='fwd'"):
        memory_budget(Case("fwd", "bf16", 1, 2, 2, 64, 64, 32, False))


def test_default_memory_grid_reaches_the_target_seqlen():
    cases = bc.build_cases(bc.Grid(modes=("memory",)))
    assert cases[-1] == TARGET_CASE
    assert [c.seqlen_q for c in cases] == [512 * 2**i for i in range(7)]
    # SDPA-math cannot take it even on an H200: n/a by the estimate, not an out-of-memory error.
    assert math_bytes(TARGET_CASE) > 141 * 2**30
    assert "GiB" in SdpaProvider("math").na_reason(TARGET_CASE, DeviceInfo(CPU, 141 * 2**30))


def _grid(*argv: str) -> bc.Grid:
    from attnkit.bench.cli import grid_from_args

    return grid_from_args(build_parser().parse_args(["bench", *argv]), on_gpu=True)


def test_memory_seqlens_option():
    grid = _grid("--mode", "memory", "--memory-seqlens", "32k")
    assert bc.build_cases(grid) == [TARGET_CASE]
    both = _grid("--seqlens", "1k,2k", "--memory-seqlens", "4k")
    assert (both.seqlens, both.memory_seqlens) == ((1024, 2048), (4096,))
    assert _grid("--seqlens", "1k").memory_seqlens == (1024,)  # --seqlens alone still sets both
    with pytest.raises(ValueError, match="--memory-seqlens"):
        _grid("--memory-seqlens", "lots")


def _record(peak_mib: float, provider: str = "p", case: Case = TARGET_CASE) -> Record:
    record = Record(case, provider, "ok", peak_mib=peak_mib)
    runner._fill_budget(record)
    return record


def test_record_ratio_and_markdown_cells():
    good, over = _record(514.0, "good"), _record(640.0, "over")  # 1.00x and (512 + 640) / 1026 = 1.12x
    assert good.budget_mib == 1026 and good.inputs_mib == 512
    assert runner.within_target(good) and not runner.within_target(over)
    assert runner.within_target(Record(TARGET_CASE, "cpu", "ok")) is None  # no peak measured
    md = markdown([good, over], {}, [], ["good", "over"])
    assert "| seqlen | batch x heads | inputs MiB (q+k+v+dout) | budget MiB | `good` | `over` |" in md
    assert "| 32768 | 1x16 | 512 | 1026 | **514** (1.00x, pass) | 640 (1.12x, fail) |" in md
    assert "q, k, v and dout exist before and are not in it" in md


def test_record_without_backward_has_no_budget():
    record = _record(10.0, case=Case("decode", "bf16", 1, 4, 2, 1, 64, 32, False))
    assert record.budget_ratio is None and record.budget_mib is None


class NoGqaKernel(Provider):
    """A provider whose kernel needs K/V repeated per query head (Kernel.prepare), as SDPA without GQA."""

    name = "repeats-kv"

    def build(self, case: Case, device: torch.device) -> Kernel:
        group = case.heads_q // case.heads_k

        def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            return q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)

        return Kernel(SdpaProvider("math")._call(case.causal, False), prepare=repeat_kv)


def test_peak_is_measured_from_the_case_inputs(monkeypatch):
    """The peak (and so the ratio) includes a provider's input transform: measured on the case's K/V heads."""
    seen = []

    def fake_peak(fn, case, inputs, device):
        seen.append(tuple(inputs[1].shape))
        fn(*inputs[:3])  # the transform runs inside the measured call
        return 3.0

    monkeypatch.setattr(runner, "peak_memory_mib", fake_peak)
    case = Case("memory", "fp32", 1, 4, 2, 32, 32, 16, False)
    (record,) = run_bench(BenchConfig([case], {"repeats-kv": NoGqaKernel()}, CPU)).records
    assert record.status == "ok", record.reason
    assert seen == [(1, 32, 2, 16)]
    budget = memory_budget(case)
    assert record.budget_ratio == pytest.approx((budget.before + 3.0 * MIB) / budget.total)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_memory_plot_draws_the_target(tmp_path):
    from attnkit.bench import plots

    cases = [Case("memory", "bf16", 1, 16, 16, s, s, 128, False) for s in (16384, 32768)]
    records = [_record(peak, case=c) for c, peak in zip(cases, (257.0, 514.0))]
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    plots._draw(ax, "memory", records, ["p"], {"p": "C0"})
    (target,) = [line for line in ax.get_lines() if line.get_label().startswith("target")]
    expected = [memory_budget(c).max_peak_extra() / MIB for c in cases]
    assert list(target.get_xdata()) == [16384, 32768] and list(target.get_ydata()) == pytest.approx(expected)
    plt.close(fig)
    (path,) = plots.plot_results(records, tmp_path, ["p"])
    assert path.name == "memory.png" and path.stat().st_size > 1000
