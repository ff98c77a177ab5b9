"""``attnkit bench``: compare attnkit backends with PyTorch SDPA, FlexAttention and flash-attn on this machine."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

from .cases import DTYPES, OVERHEAD, QUICK_GRID, Grid, build_cases, parse_ints, parse_kv_lens, parse_modes

EPILOG = """\
examples:
  attnkit bench                                   # default grid on the GPU (flash-attn's), all providers
  attnkit bench --mode fwd --dims 128 --causal true --providers triton,sdpa:flash,flex
  attnkit bench --mode decode --kv-lens 4k,32k,128k
  attnkit bench --mode decode --kv-lens 1x128k,1x16k,4x32k,16x8k --providers triton,triton+seqlens,sdpa:cudnn
  attnkit bench --mode memory --memory-seqlens 32k  # the O(seqlen) memory target: peak vs budget, pass/fail
  attnkit bench --mode overhead                   # wall time per eager call at tiny sizes, beside SDPA (CPU too)
  attnkit bench --quick --out /tmp/bench          # tiny sizes, also on CPU
  attnkit bench --plot-from results/results.json  # figures from a saved run (e.g. where matplotlib is missing)
  attnkit bench --mode fwd,bwd --dims 64,128,256 --providers attnkit --speed-table my_table.json
  attnkit bench --speed-table-from a/results.json --speed-table-from b/results.json --speed-table t.json
providers: attnkit:<backend> (or just the backend name), attnkit:<backend>+seqlens|+paged16|+paged256 (decode
  with a cache_seqlens tensor, or a paged cache), sdpa:flash, sdpa:cudnn, sdpa:efficient, sdpa:math, flex,
  flash_attn, flash_attn3; groups: attnkit, sdpa, peers, default, all. Decode reports eager and CUDA-graph GB/s
  side by side. See benchmarks/README.md.
"""


def _csv_arg(values: list[str] | None) -> list[str]:
    return [part.strip() for v in values or [] for part in v.split(",") if part.strip()]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark attnkit backends against SDPA, FlexAttention and flash-attn",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", action="append", metavar="MODE",
                   help="fwd, bwd, fwdbwd, decode, memory, overhead (repeatable or comma list; default on GPU: "
                        "fwd,bwd,decode,memory; on CPU: fwd,bwd)")  # fmt: skip
    p.add_argument("--dims", help="head dims, comma list (default 64,128,256)")
    p.add_argument("--seqlens", help="sequence lengths, comma list, 1k = 1024 (default 512..16k; sets the memory "
                                     "mode's too unless --memory-seqlens is given)")  # fmt: skip
    p.add_argument("--memory-seqlens", help="sequence lengths of the memory mode (batch 1, 16 heads, head dim 128), "
                                            "comma list (default 512..32k)")  # fmt: skip
    p.add_argument("--causal", choices=("true", "false", "both"), default="both")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--providers", action="append", help="repeatable or comma list (default: see --list-providers)")
    p.add_argument("--out", type=Path, help="output directory (default ./attnkit-bench-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seqlens 64,128, dims 32,64, 2 heads)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--separate-plots", action="store_true", help="one PNG per panel instead of one per mode")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no new case after this long")
    p.add_argument("--case-time", type=float, default=None, metavar="SECONDS",
                   help="timing budget per case and provider (default 0.2 on GPU, 0.02 on CPU)")  # fmt: skip
    p.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                   help="total FlexAttention compile time; later new shapes read n/a (default: unlimited)")  # fmt: skip
    p.add_argument("--tokens", type=int, help="batch = tokens // seqlen (default 16384)")
    p.add_argument("--hidden", type=int, help="heads = hidden // head_dim (default 2048)")
    p.add_argument("--heads", type=int, help="fixed number of heads instead of hidden // head_dim")
    p.add_argument("--kv-lens", help="decode KV lengths, comma list; BxL fixes the batch of one (1x128k), else "
                                     "batch = 128k / L (default 1k..128k)")  # fmt: skip
    p.add_argument("--decode-heads", help="decode query/KV heads as Q/K (default 32/8)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--progress", choices=("auto", "rich", "tqdm", "plain"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="inputs, and the batch and KV head the check draws")
    p.add_argument("--list-providers", action="store_true", help="list providers with availability and exit")
    p.add_argument("--plot-from", type=Path, metavar="JSON", help="only draw figures from a results.json")
    p.add_argument("--overhead-seconds", type=float, default=None, metavar="SECONDS",
                   help="overhead mode: timing per case, all providers (default 3 on GPU, 2 on CPU)")  # fmt: skip
    p.add_argument("--overhead-rounds", type=int, default=15, metavar="N",
                   help="overhead mode: rounds per case; medians are over these (default 15)")  # fmt: skip
    p.add_argument(
        "--speed-table",
        type=Path,
        metavar="JSON",
        help="write the measured speed table auto ranks backends by (attnkit.speed) from this run's fwd and "
        "bwd records; use it with ATTNKIT_SPEED_TABLE=JSON or commit it as backends/speed_table.json",
    )
    p.add_argument(
        "--speed-table-from",
        type=Path,
        action="append",
        metavar="RESULTS_JSON",
        help="build --speed-table from saved results.json files of one GPU instead of running (repeatable)",
    )
    p.set_defaults(func=run_cli)


def grid_from_args(args: argparse.Namespace, on_gpu: bool) -> Grid:
    quick = args.quick or not on_gpu  # the full grid on a CPU would run for days
    grid = QUICK_GRID if quick else Grid()
    modes = parse_modes(args.mode) if args.mode else (("fwd", "bwd", "decode", "memory") if on_gpu else ("fwd", "bwd"))
    changes: dict[str, object] = {"modes": modes, "dtype": args.dtype or ("bf16" if on_gpu else "fp32")}
    if args.dims:
        changes["dims"] = parse_ints(args.dims, "--dims")
    if args.seqlens:
        changes["seqlens"] = changes["memory_seqlens"] = parse_ints(args.seqlens, "--seqlens")
    if args.memory_seqlens:
        changes["memory_seqlens"] = parse_ints(args.memory_seqlens, "--memory-seqlens")
    changes["causal"] = {"true": (True,), "false": (False,), "both": (False, True)}[args.causal]
    for name in ("tokens", "hidden", "heads"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.kv_lens:
        changes["decode_kv"], changes["decode_batches"] = parse_kv_lens(args.kv_lens)
    if args.decode_heads:
        hq, _, hk = args.decode_heads.partition("/")
        changes["decode_heads"] = (int(hq), int(hk or hq))
    return replace(grid, **changes)


def _list_providers(device) -> int:
    from .providers import all_providers, default_names

    providers = all_providers()
    defaults = set(default_names(providers, device))
    for name, p in providers.items():
        why = p.unavailable()
        state = "available" if why is None else f"unavailable: {why}"
        print(f"{name:<28} {'default ' if name in defaults else '        '}{state}")
    return 0


def _plot_only(args: argparse.Namespace) -> int:
    from .report import load_json
    from .session import make_plots

    records, document = load_json(args.plot_from)
    out = args.out or args.plot_from.parent
    out.mkdir(parents=True, exist_ok=True)
    files, why_not = make_plots(out, records, document["config"]["providers"], document["meta"].get("gpu"),
                                args.separate_plots)  # fmt: skip
    if why_not:
        print(why_not, file=sys.stderr)
        return 1
    print("\n".join(str(f) for f in files))
    return 0


def _overhead(args: argparse.Namespace, device, dtype: str, out_dir: Path) -> None:
    from .overhead import markdown, run

    seconds = args.overhead_seconds if args.overhead_seconds is not None else (3.0 if device.type == "cuda" else 2.0)
    result = run(device, DTYPES[dtype], seconds=seconds, rounds=args.overhead_rounds, out_dir=out_dir,
                 log=lambda line: print(line, file=sys.stderr))  # fmt: skip
    print(markdown(result))
    print(f"overhead results in {out_dir}: overhead.json, overhead.md")


def _speed_source(meta: dict) -> str:
    keys = ("gpu", "driver", "torch", "triton", "cupy", "date_utc", "attnkit_commit")
    return ", ".join(f"{k} {meta[k]}" for k in keys if meta.get(k))


def _write_speed_table(path: Path, documents: list[tuple[str, dict]]) -> int:
    from attnkit import speed

    rows: list[dict] = []
    caps = set()
    sources = []
    for label, doc in documents:
        cap = doc["meta"].get("compute_capability")
        if not cap:
            print("attnkit bench: --speed-table needs GPU results (no compute capability in the run)", file=sys.stderr)
            return 2
        # The GPU kind is the run's, not this machine's: a table may be built from saved runs anywhere.
        caps.add((cap, doc["meta"].get("torch_hip") is not None))
        rows += doc["results"]
        sources.append(f"{label} ({_speed_source(doc['meta'])})")
    if len(caps) != 1:
        kinds = sorted(f"{'hip' if h else 'sm'} {c}" for c, h in caps)
        print(f"attnkit bench: --speed-table-from runs of several GPU kinds ({kinds})", file=sys.stderr)
        return 2
    cap, hip = caps.pop()
    major, _, minor = cap.partition(".")
    table = speed.build(rows, (int(major), int(minor)), hip, source="; ".join(dict.fromkeys(sources)))
    if not table["entries"]:
        print("attnkit bench: no attnkit fwd/bwd records at seqlen >= 2k to rank", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    for line in speed.describe(speed.parse(table, str(path))):
        print(line)
    return 0


def run_cli(args: argparse.Namespace) -> int:
    import torch

    if args.speed_table_from:
        if not args.speed_table:
            print("attnkit bench: --speed-table-from needs --speed-table PATH", file=sys.stderr)
            return 2
        saved = [(str(p), json.loads(p.read_text())) for p in args.speed_table_from]
        return _write_speed_table(args.speed_table, saved)
    if args.plot_from:
        return _plot_only(args)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.list_providers:
        return _list_providers(device)
    from .session import Options, run, summary

    on_gpu = device.type == "cuda"
    try:
        grid = grid_from_args(args, on_gpu)
        cases = build_cases(grid)
    except ValueError as exc:
        print(f"attnkit bench: {exc}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or Path(f"attnkit-bench-{stamp}")
    if OVERHEAD in grid.modes:
        _overhead(args, device, grid.dtype, out_dir)
        if not cases:
            return 0
    if not on_gpu and not args.quick:
        print("attnkit bench: no GPU, running the --quick grid", file=sys.stderr)
    options = Options(
        out_dir=out_dir,
        device=device,
        providers=_csv_arg(args.providers) or ["default"],
        plots=not args.no_plots,
        separate_plots=args.separate_plots,
        time_budget_s=args.time_budget,
        case_time_s=args.case_time if args.case_time is not None else (0.2 if on_gpu else 0.02),
        compile_budget_s=args.compile_budget,
        min_repeats=5 if on_gpu else 3,
        progress=args.progress,
        seed=args.seed,
        extra_config={"argv": sys.argv[1:], "quick": args.quick or not on_gpu},
    )
    try:
        result = run(cases, options)
    except ValueError as exc:
        print(f"attnkit bench: {exc}", file=sys.stderr)
        return 2
    print(summary(result, out_dir))
    if args.speed_table:
        results = out_dir / "results.json"
        return _write_speed_table(args.speed_table, [(str(results), json.loads(results.read_text()))])
    return 0
