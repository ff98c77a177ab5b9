"""Child process of test_triton_sm90_compile: compiles the Triton kernels for sm_90 through a fake driver.

Run as a script in a fresh interpreter without TRITON_INTERPRET (triton reads it when the kernels are decorated).
Every ``JITFunction.run`` is turned into a compile-only warm-up, so the launchers build their real argument lists
and each kernel goes through triton's front end, its optimiser and ptxas for sm_90a, with nothing launched. Prints
``RESULTS <json>``: [kernel name, "ok" or the error, cubin bytes, whether direct_launch's packing of the kernel
(its non-constexpr signature entries, then the two scratch pointers) matches the compiled PTX's parameters in
count and size] per compile.
"""

from __future__ import annotations

import json
import os
import re

os.environ.pop("TRITON_INTERPRET", None)
os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"

import torch
from attnkit.backends.triton import compile_only
from triton.runtime import jit as jitmod


def main() -> None:
    compile_only.activate()  # sm_90
    results: list[list[object]] = []
    original = jitmod.JITFunction.run

    from attnkit.backends.triton import direct_launch

    def packing_matches_ptx(kernel) -> bool:
        packed = direct_launch.packed_sizes(kernel.src.signature)
        ptx = kernel.asm["ptx"]
        entry = ptx[ptx.index(".entry") :]
        declared = [int(bits) // 8 for bits in re.findall(r"\.param\s+\.[bufs](\d+)", entry[: entry.index(")")])]
        return packed == declared

    def warm_up_only(self, *args, grid, warmup, **kwargs):
        try:
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            results.append([self.fn.__name__, "ok", len(kernel.asm["cubin"]), packing_matches_ptx(kernel)])
        except Exception as exc:  # reported, not raised: one failing kernel must not hide the others
            results.append([self.fn.__name__, f"{type(exc).__name__}: {str(exc)[:400]}", 0, False])

    jitmod.JITFunction.run = warm_up_only
    from attnkit.backends.triton import append_launch, fastpath, kvcache_launch, launch, lengths_check, merge_launch

    from attnkit.params import AttentionParams, KVCacheInfo, VarlenInfo

    fastpath.ENABLED = False  # plans would bind compiled kernels to a driver
    bf = torch.bfloat16
    causal = AttentionParams(softmax_scale=0.125, causal=True, window_right=0)
    for d, dv in ((64, 64), (128, 128), (36, 24), (256, 256)):
        q, k = torch.randn(1, 200, 4, d, dtype=bf), torch.randn(1, 177, 2, d, dtype=bf)
        v = torch.randn(1, 177, 2, dv, dtype=bf)
        out, lse = launch.forward(q, k, v, None, causal, None, "nvidia")
        launch.backward(torch.randn_like(out), q, k, v, out, lse, None, causal, None, "nvidia")
    cu = torch.tensor([0, 50, 177], dtype=torch.int32)
    qv, kv = torch.randn(177, 4, 64, dtype=bf), torch.randn(177, 2, 64, dtype=bf)
    launch.forward(qv, kv, kv, None, causal, VarlenInfo(cu, cu, 127, 127), "nvidia")
    k_cache, v_cache = torch.randn(2, 256, 2, 64, dtype=bf), torch.randn(2, 256, 2, 64, dtype=bf)
    lens = torch.tensor([100, 7], dtype=torch.int32)
    new = torch.randn(2, 1, 2, 64, dtype=bf)
    append_launch.append_kv(k_cache, v_cache, new, new, lens, None, None)
    append_launch.append_kv(k_cache, v_cache, new, new, 100, None, None)  # an int length: a number argument
    append_launch.append_kv(k_cache, v_cache, new, new, lens, None, None, 255)  # the range-checked kernel (debug)
    lengths_check.check(lens, 0, 255)
    q1 = torch.randn(2, 1, 4, 64, dtype=bf)
    kvcache_launch.forward_kvcache(q1, k_cache, v_cache, KVCacheInfo(lens, None, None, None, 4), None, causal)
    parts = torch.randn(3, 2, 5, 4, 64, dtype=torch.float32)
    merge_launch.merge_states(parts, torch.randn(3, 2, 4, 5), bf)
    compile_tma_length_one(launch, bf)
    compile_tma_decode(kvcache_launch, bf)
    print("RESULTS", json.dumps(results))


def compile_tma_length_one(launch, dtype: torch.dtype) -> None:
    """The TMA tiles (CPU tensors never qualify for them on their own) at sequence length 1, where triton folds
    the inner loops away: triton 3.6's pipeliner aborted on the descriptors that the backward's head loop and
    the persistent forward's tile loop then create in their innermost loop."""
    from attnkit.backends.triton import configs, tuning

    from attnkit.params import AttentionParams

    launch.tma_eligible = lambda prob, tensors: True
    plain = AttentionParams(softmax_scale=0.1)
    persistent = configs.Tile(64, 64, 4, 3, use_tma=True, persistent=2)
    for d in (80, 128):
        q, k = torch.randn(1, 1, 4, d, dtype=dtype), torch.randn(1, 129, 2, d, dtype=dtype)
        out, lse = launch.forward(q, k, k, None, plain, None, "nvidia")
        launch.backward(torch.randn_like(out), q, k, k, out, lse, None, plain, None, "nvidia")
        one = torch.randn(1, 1, 2, d, dtype=dtype)
        with tuning.forced_tiles(fwd=persistent):
            launch.forward(q, one, one, None, plain, None, "nvidia")


def compile_tma_decode(kvcache_launch, dtype: torch.dtype) -> None:
    """The decoding kernel's TMA loop (CPU tensors never qualify on their own): a contiguous cache, whose
    descriptors end at the split's end, and a paged pool, whose block that ends the split masks its values."""
    from attnkit.params import AttentionParams, KVCacheInfo

    kvcache_launch.tma_eligible = lambda k_cache, v_cache, info, block_n: True
    params = AttentionParams(softmax_scale=0.1, causal=True, window_right=0)
    q = torch.randn(2, 1, 8, 128, dtype=dtype)
    lens = torch.tensor([300, 1000], dtype=torch.int32)
    cache = torch.randn(2, 1024, 2, 128, dtype=dtype)
    kvcache_launch.forward_kvcache(q, cache, cache, KVCacheInfo(lens, None, None, None, 3), None, params)
    pool, table = torch.randn(16, 128, 2, 128, dtype=dtype), torch.arange(16, dtype=torch.int32).view(2, 8)
    kvcache_launch.forward_kvcache(q, pool, pool, KVCacheInfo(lens, None, table, None, 3), None, params)


if __name__ == "__main__":
    main()
