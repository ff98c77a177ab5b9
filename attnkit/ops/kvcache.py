"""``attnkit.attention_with_kvcache``: decoding/prefill against a (possibly paged) KV cache, forward only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import fp8, validation
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ..params import lse_dtype
from . import _common, _fastcall, _fp8_library, _kvcache_checks, _library
from ._kvcache_checks import int32_vector
from .rotary import apply_rotary, check_tables


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    num_splits: int = 0,
    backend: str | Sequence[str] = "auto",
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over a KV cache, appending new keys/values in place (flash-attn semantics).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k_cache, v_cache: ``(batch_cache, seqlen_cache, nheads_k, headdim[_v])``, or, with ``block_table``, a paged
            cache ``(num_blocks, page_size, nheads_k, headdim[_v])`` with ``page_size`` a multiple of 16.
        k, v: optional new keys/values ``(batch, seqlen_new, nheads_k, headdim[_v])``, written into the cache at
            positions ``cache_seqlens[b] ...`` before attending. attnkit checks first that they fit: on the host
            for int lengths and CPU tensors (an InvalidArgumentError); for CUDA tensors (lengths, pages, rows) on
            the device, without a device sync, where a failure is a device-side assert.
        cache_seqlens: int32 ``(batch,)`` (or an int): tokens already in each cache row *before* the append (with
            ``cache_leftpad``: the position after the last one). Default: the whole cache (only without ``k``/``v``).
        cache_batch_idx: int32 ``(batch,)``: which cache row each batch row uses (default ``arange(batch)``).
        cache_leftpad: int32 ``(batch,)``: where each row's keys start (flash-attn 2.6's left-padded caches;
            default 0). Row ``b`` attends to positions ``cache_leftpad[b] ... cache_seqlens[b] + seqlen_new - 1``,
            a sequence of its own for masks and ALiBi; rotary positions stay absolute.
        block_table: int32 ``(batch, max_blocks)``: pages of each row of a paged cache.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``: rotary embedding applied to ``k`` at positions
            ``cache_seqlens + arange(seqlen_new)`` and to ``q`` at ``cache_seqlens + arange(seqlen_q)`` if causal or
            windowed, else at ``cache_seqlens`` (every query at the same position). Needs ``k``.
        rotary_interleaved: rotate channel pairs (0,1),(2,3)... (True) or the two halves (False).
        return_lse: also return the log-sum-exp ``(batch, nheads, seqlen_q)`` float32, natural log, as flash-attn's
            ``return_softmax_lse`` (e.g. for :func:`attnkit.merge_attention_states`).
        num_splits: programs sharing one row's keys in a split-KV kernel; 0 (default) lets the backend choose
            (FA3's heuristic on the Triton backends), 1 disables splitting. A performance knob only.
        q_descale, k_descale, v_descale, out_dtype: for a float8_e4m3fn q and cache (and new k/v), as in
            :func:`attnkit.attention`: ``(batch, nheads_k)`` float32, indexed by q's batch row; no rotary.
        Other keywords as in :func:`attnkit.attention` (no dropout). Forward only, like flash-attn: with grad
            mode on, an input that requires grad raises InvalidArgumentError (use torch.no_grad()).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, or ``(out, lse)``.
    """
    key = _fastcall.kvcache_key(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size, softcap,
        return_lse, num_splits, backend,
        cache_batch_idx is None and cache_leftpad is None and rotary_cos is None and rotary_sin is None
        and alibi_slopes is None and q_descale is None and k_descale is None and v_descale is None
        and out_dtype is None and (k is None) == (v is None) and (cache_seqlens is not None or k is None),
    )  # fmt: skip
    hit = _fastcall.lookup_kvcache(key)
    if hit is not None:
        out, lse = _run_resolved(hit, q, k_cache, v_cache, k, v, cache_seqlens, block_table)
        return (out, lse) if return_lse else out
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    is_fp8 = fp8.same_dtype_device({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    validation.heads_and_dims(q.shape, k_cache.shape, v_cache.shape, seq_axis=None)
    # The cache is written in place, so it cannot be copied to make it contiguous: ask for it instead.
    validation.last_dim_contiguous({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    device = q.device
    for flag, value in (("return_lse", return_lse), ("rotary_interleaved", rotary_interleaved)):
        if not isinstance(value, bool):
            raise InvalidArgumentTypeError(f"{flag} must be a bool, got {value!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= _MAX_SPLITS:
        raise InvalidArgumentError(
            f"num_splits is {num_splits!r}; allowed: 0 (the backend chooses) or 1..{_MAX_SPLITS}"
        )
    # Checks that need tensor values run on the device (_kvcache_checks.device_check, in stream order before any
    # write) wherever a read-back would stall: on a GPU (a read-back is a device sync per decode step), and while a
    # CUDA graph is captured or torch.compile traces (nothing can be read back then).
    capturing = _capturing(device) or device.type == "cuda"
    if (k is None) != (v is None):
        raise InvalidArgumentError("pass both k and v to append, or neither")
    seqlen_new = 0
    if k is not None:
        k = validation.tensor("k", k, 4)
        v = validation.tensor("v", v, 4)
        fp8.same_dtype_device({"q": q, "k": k, "v": v})
        if tuple(k.shape) != (batch, k.shape[1], k_cache.shape[2], head_dim) or tuple(v.shape) != (
            batch, k.shape[1], v_cache.shape[2], v_cache.shape[3],
        ):  # fmt: skip
            raise InvalidArgumentError(
                f"new k/v must be ({batch}, seqlen_new, {k_cache.shape[2]}, {head_dim}/{v_cache.shape[3]}), got "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        seqlen_new = k.shape[1]
    paged = block_table is not None
    if paged:
        block_table = _block_table(block_table, cache_batch_idx, k_cache, batch, device)
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        cache_batch_idx = _cache_rows(cache_batch_idx, k_cache, batch, k is not None, device, capturing)
    if cache_seqlens is None and k is not None:
        raise InvalidArgumentError("cache_seqlens is required when appending k/v (where would they go?)")
    lengths = _kvcache_checks.lengths(cache_seqlens, cache_leftpad, batch, capacity, seqlen_new, device, capturing)
    full_cache = cache_seqlens is None
    cache_seqlens, cache_leftpad = lengths.seqlens, lengths.leftpad
    if seqlen_new and not torch.compiler.is_compiling():  # traced: the op checks when it runs (no data_ptr here)
        _kvcache_checks.caches_writable(k_cache, v_cache)
    if paged:
        _kvcache_checks.pages(block_table, cache_seqlens, cache_leftpad, seqlen_new, k_cache.shape[0],
                              k_cache.shape[1], capturing)  # fmt: skip

    params = _common.resolve_params(
        head_dim=head_dim,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        softcap=softcap,
        dropout_p=0.0,
        deterministic=False,
    )
    slopes = validation.alibi_slopes(alibi_slopes, batch, num_heads_q, device)
    scales = fp8.scales(
        is_fp8, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, out_dtype=out_dtype, batch=batch, num_heads_k=k_cache.shape[2], requires_grad=False,
    )  # fmt: skip
    fp8.no_rotary(is_fp8, rotary_cos is not None or rotary_sin is not None)
    per_query = params.is_masked
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None or k is None:
            raise InvalidArgumentError("rotary needs rotary_cos, rotary_sin and new k/v together")
        rotary_cos, rotary_sin = check_tables(rotary_cos, rotary_sin, head_dim, device)
        reach = max(seqlen_new, seqlen_q if per_query else 1)
        if lengths.host is None:
            enough = (cache_seqlens + reach <= rotary_cos.shape[0]).all()
            _kvcache_checks.device_check(enough, f"rotary_cos has {rotary_cos.shape[0]} positions; a row needs more")
        elif rotary_cos.shape[0] < lengths.longest + reach:
            raise InvalidArgumentError(
                f"rotary_cos has {rotary_cos.shape[0]} positions; this call needs {lengths.longest + reach}"
            )
    _forward_only(
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "rotary_cos": rotary_cos,
         "rotary_sin": rotary_sin, "alibi_slopes": slopes}
    )  # fmt: skip
    # The backend is chosen before anything is written: an unknown or refusing backend, or a malformed ATTNKIT_*
    # variable, must leave the cache as it was.
    chosen = _common.choose(
        "paged_kvcache" if paged else "kvcache",
        backend,
        q=q,
        head_dim_v=v_cache.shape[-1],
        num_heads_k=k_cache.shape[2],
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=capacity if batch else 0,  # static: the lengths change every decode step
        params=params,
        alibi=slopes is not None,
        requires_grad=False,
        fp8=scales is not None,
    )

    # Every check has passed: from here on the call writes (the rotated new keys, then the cache).
    if rotary_cos is not None:
        base = cache_seqlens.long()[:, None]
        k_pos = base + torch.arange(seqlen_new, device=device)[None, :]
        q_pos = base + (torch.arange(seqlen_q, device=device)[None, :] if per_query else 0)
        q_pos = q_pos.expand(batch, seqlen_q)
        k = apply_rotary(k, rotary_cos[k_pos], rotary_sin[k_pos], rotary_interleaved)
        q = apply_rotary(q, rotary_cos[q_pos], rotary_sin[q_pos], rotary_interleaved)
    if q.numel() == 0:  # no batch rows, queries or heads: nothing to attend, but the append still happens
        if k is not None and seqlen_new:
            _library.append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
        out = q.new_zeros((batch, seqlen_q, num_heads_q, v_cache.shape[-1]), dtype=_out_dtype(q, scales))
        lse = torch.full((batch, num_heads_q, seqlen_q), float("-inf"), dtype=lse_dtype(q.dtype), device=device)
        return (out, lse) if return_lse else out
    if q.stride(-1) != 1:
        q = q.contiguous()
    # The op appends k/v to the cache (a declared in-place write), then attends.
    if scales is not None:
        out, lse = _fp8_library.kvcache_forward(
            q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, cache_leftpad, slopes, params,
            num_splits, scales, chosen,
        )  # fmt: skip
        return (out, lse) if return_lse else out
    out, lse = _library.kvcache_forward(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, cache_leftpad, slopes,
        params.softmax_scale, params.causal, params.window_left, params.window_right, params.softcap, num_splits,
        chosen,
    )  # fmt: skip
    step = (q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    full = cache_seqlens if full_cache else None  # the same lengths every step: kept, not made again
    _fastcall.remember_kvcache(key, params, chosen, capacity, num_splits, step, return_lse, full)
    return (out, lse) if return_lse else out


def _run_resolved(hit: _fastcall.ResolvedKVCache, q, k_cache, v_cache, k, v, cache_seqlens, block_table):
    """A repeated decode step: the checks whose inputs change per call (lengths, pages), then the op (or, in
    plain eager mode, its implementation directly; see _fastcall)."""
    batch, device = q.shape[0], q.device
    seqlen_new = 0 if k is None else k.shape[1]
    eager = _fastcall.plain_eager(q, k_cache, v_cache)
    if type(cache_seqlens) is int and seqlen_new and block_table is None and hit.runner is not None:
        # The backend's step takes the length as a number: no device tensor of it (torch.full is ~10 us a step).
        _kvcache_checks.int_length(cache_seqlens, batch, hit.capacity, seqlen_new)
        if eager:
            done = hit.runner(q, k_cache, v_cache, k, v, cache_seqlens, None)
            if done is not None:
                return done
    if cache_seqlens is None and block_table is None and hit.full_lengths is not None and hit.runner is not None:
        # A full contiguous cache read as it is (the key says: no append); a block table's pages are checked below.
        if eager:
            done = hit.runner(q, k_cache, v_cache, None, None, hit.full_lengths, None)
            if done is not None:
                return done
    # Tensor lengths on a GPU with an append: the bound step's append kernel checks their range itself.
    deferred = eager and seqlen_new > 0 and hit.runner is not None and type(cache_seqlens) is torch.Tensor
    deferred = deferred and _asserts_on_device(cache_seqlens)
    if deferred and block_table is None:  # a contiguous cache: no page checks, straight to the bound step
        seqlens = _kvcache_checks.int32_vector("cache_seqlens", cache_seqlens, batch, device)
        done = hit.runner(q, k_cache, v_cache, k, v, seqlens, None, check=True)
        if done is not None:
            return done
    capturing = _capturing(device) or device.type == "cuda"
    range_check = _left_to_the_step if deferred else hit.backend.check_lengths
    lengths = _kvcache_checks.lengths(cache_seqlens, None, batch, hit.capacity, seqlen_new, device, capturing,
                                      range_check)  # fmt: skip
    if block_table is not None:
        block_table = block_table.contiguous()
        _kvcache_checks.pages(block_table, lengths.seqlens, None, seqlen_new, k_cache.shape[0], k_cache.shape[1],
                              capturing)  # fmt: skip
    p = hit.params
    if eager and hit.runner is not None:
        done = hit.runner(q, k_cache, v_cache, k, v, lengths.seqlens, block_table, check=deferred)
        if done is not None:
            return done
    if deferred and lengths.host is None:  # the step could not take the check: it runs before the general path
        _kvcache_checks.range_on_device(lengths.seqlens, hit.capacity - seqlen_new, seqlen_new, hit.capacity,
                                        hit.backend.check_lengths)  # fmt: skip
    if eager:
        return _library.run_kvcache(q, k_cache, v_cache, k, v, lengths.seqlens, None, block_table, None, None, p,
                                    hit.num_splits, hit.backend_name)  # fmt: skip
    return _library.kvcache_forward(
        q, k_cache, v_cache, k, v, lengths.seqlens, None, block_table, None, None, p.softmax_scale, p.causal,
        p.window_left, p.window_right, p.softcap, hit.num_splits, hit.backend_name,
    )  # fmt: skip


# The range check of tensor lengths inside the bound step's append kernel (one launch fewer per decode step than
# the separate check kernel, which stays the fallback). A module constant so that the GPU tests can run both ways.
FUSED_RANGE_CHECK = True


def _asserts_on_device(lengths: torch.Tensor) -> bool:
    """Whether the bound step's append kernel takes the range check of tensor lengths: a kernel's device assert
    stops a bad step on a GPU (the Triton interpreter does not assert)."""
    return FUSED_RANGE_CHECK and lengths.is_cuda


def _left_to_the_step(lengths: torch.Tensor, low: int, high: int) -> bool:
    """A range check of tensor lengths that the bound decode step does in its append kernel (``check=True``)."""
    return True


# flash-attn's limit on num_splits (and the Triton backends' most splits per row).
_MAX_SPLITS = 128


def _block_table(block_table, cache_batch_idx, k_cache, batch, device) -> torch.Tensor:
    block_table = validation.tensor("block_table", block_table, 2)
    if block_table.dtype != torch.int32 or block_table.shape[0] != batch or block_table.device != device:
        raise InvalidArgumentError(
            f"block_table must be int32 ({batch}, max_blocks) on {device}, got {block_table.dtype} "
            f"{tuple(block_table.shape)} on {block_table.device}"
        )
    if cache_batch_idx is not None:
        raise InvalidArgumentError("cache_batch_idx cannot be combined with block_table (a paged cache)")
    page_size = k_cache.shape[1]
    if page_size <= 0 or page_size % 16:
        raise InvalidArgumentError(
            f"paged cache page size (k_cache.shape[1]) is {page_size}; allowed: a positive multiple of 16"
        )
    return block_table.contiguous()  # kernels step through a row with stride 1


def _cache_rows(cache_batch_idx, k_cache, batch, appending, device, capturing) -> torch.Tensor | None:
    """The checked cache_batch_idx of a contiguous cache (None: row b is cache row b)."""
    if cache_batch_idx is None:
        if k_cache.shape[0] != batch:
            raise InvalidArgumentError(
                f"k_cache has {k_cache.shape[0]} rows but q has batch {batch}; pass cache_batch_idx to pick rows"
            )
        return None
    rows = k_cache.shape[0]
    cache_batch_idx = int32_vector("cache_batch_idx", cache_batch_idx, batch, device)
    if capturing:
        ok = ((cache_batch_idx >= 0) & (cache_batch_idx < rows)).all()
        if appending:
            ordered = cache_batch_idx.sort().values
            ok = ok & (ordered[1:] != ordered[:-1]).all()
        _kvcache_checks.device_check(ok, f"cache_batch_idx has entries outside [0, {rows}) or repeats a row")
        return cache_batch_idx
    idx = cache_batch_idx.tolist()
    if any(not 0 <= i < rows for i in idx):
        raise InvalidArgumentError(f"cache_batch_idx={idx} has entries outside [0, {rows})")
    if appending and len(set(idx)) != len(idx):
        raise InvalidArgumentError(f"cache_batch_idx={idx} repeats a row; appends would overwrite each other")
    return cache_batch_idx


def _forward_only(named: dict[str, object]) -> None:
    """attention_with_kvcache has no backward (like flash-attn's ``flash_attn_with_kvcache``): refuse a call whose
    output autograd would try to differentiate, rather than fail later in ``backward()`` or drop the gradient."""
    if not torch.is_grad_enabled():
        return
    for name, x in named.items():
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise InvalidArgumentError(
                f"{name} requires grad, but attention_with_kvcache is forward-only (no backward, like flash-attn's "
                f"flash_attn_with_kvcache); call it under torch.no_grad() or torch.inference_mode(), or pass "
                f"{name}.detach()"
            )


def _out_dtype(q: torch.Tensor, scales: fp8.Fp8Scales | None) -> torch.dtype:
    return q.dtype if scales is None else scales.out_dtype


def _capturing(device: torch.device) -> bool:
    """True when tensor values cannot be read back: CUDA-graph capture, or torch.compile tracing the call."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
