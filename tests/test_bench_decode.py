"""``attnkit bench --mode decode``: eager and CUDA-graph numbers side by side for every provider (graph capture
and its clock are stood in for on the CPU), the decode-only ``+seqlens`` variant, and the report's columns."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import plain_attention

from attnkit.bench import providers as bench_providers
from attnkit.bench.cases import Case
from attnkit.bench.decode import SyncedHostClock, eager_block, measure_decode
from attnkit.bench.providers import AttnkitProvider, Kernel, Provider, all_providers, default_names, resolve_names
from attnkit.bench.report import markdown
from attnkit.bench.runner import BenchConfig, run_bench
from attnkit.bench.timing import HostClock
from attnkit.cli import main as cli_main

CPU = torch.device("cpu")
DECODE = Case("decode", "fp32", 2, 4, 2, 1, 48, 16, False)


def _right(q, k, v):
    return plain_attention(q, k, v)


class FakeGraphs:
    """Stands in for CUDA-graph capture: runs the step once "while capturing" and returns it as the replay."""

    def __init__(self):
        self.capturing = False
        self.captured = 0

    def __call__(self, fn):
        self.capturing = True
        try:
            fn()
        finally:
            self.capturing = False
        self.captured += 1
        return fn


class Scripted(Provider):
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def build(self, case, device):
        return Kernel(self.fn)


def test_decode_records_eager_and_graph_numbers():
    graphs = FakeGraphs()

    def refuses_capture(q, k, v):
        if graphs.capturing:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return _right(q, k, v)

    providers = {
        "attnkit:reference": AttnkitProvider("reference"),
        "attnkit:reference+seqlens": AttnkitProvider("reference", "seqlens"),
        "uncapturable": Scripted("uncapturable", refuses_capture),
    }
    config = BenchConfig([DECODE], providers, CPU, case_time_s=0.001, min_repeats=2, max_repeats=3, warmup=1,
                         graph_capture=graphs, graph_clock=HostClock())  # fmt: skip
    by = {r.provider: r for r in run_bench(config).records}
    for name in ("attnkit:reference", "attnkit:reference+seqlens"):
        r = by[name]
        assert r.status == "ok" and r.ms > 0 and r.gbps > 0 and r.graph_ms > 0 and r.graph_gbps > 0, r
        assert r.graph_reason == ""
    bad = by["uncapturable"]
    assert bad.status == "ok" and bad.gbps > 0 and bad.graph_ms is None
    assert bad.graph_reason == "not capturable: RuntimeError: operation not permitted when stream is capturing"
    assert graphs.captured == 2 * config_rotations(by)
    md = markdown(list(by.values()), {}, [], list(providers))
    assert "| kv len | batch x heads | `attnkit:reference` eager | `attnkit:reference` graph |" in md
    assert "n/a [1]" in md and "no graph: not capturable: RuntimeError" in md


def config_rotations(by):
    rotations = {r.rotations for r in by.values()}
    assert len(rotations) == 1
    return rotations.pop()


def test_measure_decode_times_blocks_and_per_set_graphs():
    """Eager: blocks of back-to-back calls cycling through the input sets; graph: one capture per input set, and
    replays cycle through them."""
    seen = []
    graphs = FakeGraphs()
    timings = measure_decode({"a": lambda i: seen.append(i)}, 3, CPU, warmup=1, min_repeats=2, max_repeats=2,
                             budget_s=0.0, capture=graphs, graph_clock=HostClock())  # fmt: skip
    assert timings["a"].eager.repeats == 2 and timings["a"].graph.repeats == 2 and graphs.captured == 3
    block_calls = []
    eager_block(block_calls.append, 4, 3)(1)
    assert block_calls == [1, 2, 0, 1]
    assert seen[:4] == [0, 1, 2, 0]  # CPU: one call per eager block, still rotating
    clock = SyncedHostClock(CPU)
    assert clock.elapsed_ms(1.0, 1.5) == 500.0


def test_decode_without_cuda_says_why_there_is_no_graph(tmp_path):
    out = tmp_path / "bench"
    rc = cli_main(["bench", "--quick", "--mode", "decode", "--providers", "reference,reference+seqlens,sdpa:math",
                   "--out", str(out), "--no-plots", "--progress", "plain", "--case-time", "0.002"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert {r["provider"] for r in doc["results"]} == {"attnkit:reference", "attnkit:reference+seqlens", "sdpa:math"}
    for r in doc["results"]:
        assert r["status"] == "ok" and r["gbps"] > 0 and r["graph_gbps"] is None
        assert r["graph_reason"] == "CUDA graphs need a CUDA device"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"graph_ms", "graph_gbps", "graph_reason"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert "`attnkit:reference+seqlens` eager | `attnkit:reference+seqlens` graph |" in md
    assert "no graph: CUDA graphs need a CUDA device" in md


def test_seqlens_variant_is_decode_only_and_passes_a_tensor(monkeypatch):
    calls = []
    real = bench_providers.attention_with_kvcache

    def spy(q, k, v, **kw):
        calls.append(kw["cache_seqlens"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(bench_providers, "attention_with_kvcache", spy)
    providers = {"attnkit:reference": AttnkitProvider("reference"),
                 "attnkit:reference+seqlens": AttnkitProvider("reference", "seqlens")}  # fmt: skip
    fwd = Case("fwd", "fp32", 1, 2, 2, 32, 32, 16, False)
    config = BenchConfig([fwd, DECODE], providers, CPU, case_time_s=0.001, min_repeats=2, max_repeats=2, warmup=0)
    records = run_bench(config).records
    assert sorted((r.case.mode, r.provider) for r in records) == [
        ("decode", "attnkit:reference"), ("decode", "attnkit:reference+seqlens"), ("fwd", "attnkit:reference"),
    ]  # fmt: skip
    lengths = [c for c in calls if c is not None]
    assert lengths and all(torch.equal(c, torch.full((2,), 48, dtype=torch.int32)) for c in lengths)
    assert None in calls  # the plain provider leaves the lengths to the default


def test_provider_names(monkeypatch):
    providers = all_providers()
    assert resolve_names(["triton+seqlens"], providers, CPU) == ["attnkit:triton_cuda+seqlens"]
    assert resolve_names(["attnkit:reference+seqlens"], providers, CPU) == ["attnkit:reference+seqlens"]
    with pytest.raises(ValueError, match="unknown provider"):
        resolve_names(["nope+seqlens"], providers, CPU)
    assert default_names(providers, CPU) == ["attnkit:reference", "sdpa:math"]
    monkeypatch.setattr(AttnkitProvider, "unavailable", lambda self: None)
    gpu = default_names(providers, torch.device("cuda"))
    assert "attnkit:triton_cuda" in gpu and "attnkit:triton_cuda+seqlens" in gpu
    assert not any(n.startswith("attnkit:reference") for n in gpu)


def test_paged_variants_judged_on_the_case_inputs():
    """+paged16 moves the cache into shuffled pages before timing (its correctness is judged on the case's own
    contiguous K/V through that transform); +paged256 is n/a for a cache that is not a whole number of pages."""
    providers = {name: AttnkitProvider("reference", variant) for name, variant in
                 (("attnkit:reference", ""), ("attnkit:reference+paged16", "paged16"),
                  ("attnkit:reference+paged256", "paged256"))}  # fmt: skip
    config = BenchConfig([DECODE], providers, CPU, case_time_s=0.001, min_repeats=2, max_repeats=2, warmup=0)
    by = {r.provider: r for r in run_bench(config).records}
    assert by["attnkit:reference+paged16"].status == "ok" and by["attnkit:reference+paged16"].gbps > 0
    assert by["attnkit:reference+paged16"].errors["out"] <= by["attnkit:reference+paged16"].allowed["out"]
    assert "pages of 16" in by["attnkit:reference+paged16"].note
    assert by["attnkit:reference+paged256"].status == "n/a"
    assert "not a multiple of the page size 256" in by["attnkit:reference+paged256"].reason


def test_kv_lens_with_batches():
    from attnkit.bench.cases import Grid, build_cases, parse_kv_lens

    lens, batches = parse_kv_lens("1x128k, 16k,16x8k")
    assert lens == (131072, 16384, 8192) and batches == (1, None, 16)
    cases = build_cases(Grid(modes=("decode",), decode_kv=lens, decode_batches=batches))
    assert [(c.batch, c.seqlen_k) for c in cases] == [(1, 131072), (8, 16384), (16, 8192)]
    for bad in ("0x4k", "x4k", "2xk", ""):
        with pytest.raises(ValueError, match="--kv-lens"):
            parse_kv_lens(bad)
    providers = all_providers()
    assert {"attnkit:triton_cuda+paged16", "attnkit:triton_cuda+paged256"} <= set(providers)
    with pytest.raises(ValueError, match="unknown variant"):
        AttnkitProvider("reference", "paged7")
