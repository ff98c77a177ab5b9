"""attnkit.distributed on 2 and 4 gloo processes against single-process attention (outputs and gradients).

Each world size is one ``torch.multiprocessing.spawn`` of ``tests/distributed_worker.py`` running every case of
``worker.cases_for(world)`` (a spawn costs seconds of interpreter start-up, a case milliseconds), so there is one
test per world size; it checks every case and reports every failing one.
"""

from __future__ import annotations

import json
import os

import distributed_worker as worker
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ERROR_WORDS = {
    "error-odd-local-length": ["local sequence length 3", "odd", "zigzag"],
    "error-shard-length": ["not a multiple of 2 * world_size"],
    "error-alibi-ring": ["alibi_slopes", "strategy='ring'", "strategy='allgather' and causal=True"],
    "error-alibi-varlen": ["alibi_slopes", "crosses the end of a rank's rows", "causal=True"],
}


def _problems(case: worker.Case, rank: int, result: dict) -> list[str]:
    where = f"{case.name} (rank {rank})"
    if case.kind in ("dense", "varlen"):
        return [
            f"{where} {t}: error {m['err']:.3g} > allowed {m['allowed']:.3g}"
            for t, m in result.items()
            if not m["err"] <= m["allowed"]
        ]
    if case.kind == "deterministic":
        return [] if result["bitwise_equal"] else [f"{where}: two deterministic runs differ"]
    if case.kind == "nan":
        ok = result["some_nan"] and result["same_nan_pattern"] and result["finite_err"] <= 1e-10
        return [] if ok else [f"{where}: NaN pattern or finite values differ from single-process: {result}"]
    if case.kind == "unshard":
        return [
            f"{where} {layout}: {r}"
            for layout, r in result.items()
            if not (r["roundtrip_equal"] and r["grad_err"] <= 1e-12)
        ]
    if case.kind == "error":
        if not result["raised"]:
            return [f"{where}: no InvalidArgumentError"]
        return [
            f"{where}: message lacks {w!r}: {result['message']}"
            for w in ERROR_WORDS[case.name]
            if w not in result["message"]
        ]
    return [f"{where}: unknown kind {case.kind!r}"]


def run_and_judge(world: int, out_dir, device: str, cases: list[worker.Case]) -> None:
    """Spawn ``world`` ranks of ``worker.main`` on ``device`` and assert every case of ``cases`` passed."""
    store = os.path.join(out_dir, "store")
    mp.spawn(worker.main, args=(world, store, str(out_dir), device), nprocs=world, join=True)
    per_rank = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            per_rank.append(json.load(f))
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    problems = []
    for case in cases:
        for rank in range(world):
            entry = per_rank[rank].get(case.name)
            if entry is None:
                problems.append(f"{case.name} (rank {rank}): not run")
            elif "crash" in entry:
                problems.append(f"{case.name} (rank {rank}) crashed:\n{entry['crash']}")
            else:
                problems.extend(_problems(case, rank, entry["result"]))
    assert not problems, f"{len(problems)} problem(s) in {len(cases)} cases:\n" + "\n".join(problems)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_single_process(world, tmp_path):
    run_and_judge(world, tmp_path, "cpu", worker.cases_for(world))
