"""``attnkit.attention_with_kvcache``: decoding/prefill against a (possibly paged) KV cache, forward only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import fp8, validation
from ..errors import InvalidArgumentError, InvalidArgumentTypeError, KVCacheOverflowError
from . import _common, _fp8_library, _library
from .rotary import apply_rotary


def _int32_vector(name: str, x: object, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32 or tuple(x.shape) != (length,):
        raise InvalidArgumentError(f"{name} must be int32 of shape ({length},), got {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise InvalidArgumentError(f"{name} is on {x.device} but q is on {device}")
    return x


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
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
            positions ``cache_seqlens[b] ...`` before attending. attnkit checks first that they fit (on the host,
            or, while a CUDA graph is captured, on the device, where a failure is a device-side assert).
        cache_seqlens: int32 ``(batch,)`` (or an int): tokens already in each cache row *before* the append.
            Default: the whole cache (only without ``k``/``v``).
        cache_batch_idx: int32 ``(batch,)``: which cache row each batch row uses (default ``arange(batch)``).
        block_table: int32 ``(batch, max_blocks)``: pages of each row of a paged cache.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``: rotary embedding applied to ``k`` at positions
            ``cache_seqlens + arange(seqlen_new)`` and to ``q`` at ``cache_seqlens + arange(seqlen_q)`` if causal or
            windowed, else at ``cache_seqlens`` (every query at the same position). Needs ``k``.
        rotary_interleaved: rotate channel pairs (0,1),(2,3)... (True) or the two halves (False).
        q_descale, k_descale, v_descale, out_dtype: for a float8_e4m3fn q and cache (and new k/v), as in
            :func:`attnkit.attention`: ``(batch, nheads_k)`` float32, indexed by q's batch row; no rotary.
        Other keywords as in :func:`attnkit.attention` (no dropout; forward only, like flash-attn).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)``, or ``(out, lse)``.
    """
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    is_fp8 = fp8.same_dtype_device({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    validation.heads_and_dims(q.shape, k_cache.shape, v_cache.shape, seq_axis=None)
    # The cache is written in place, so it cannot be copied to make it contiguous: ask for it instead.
    validation.last_dim_contiguous({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    device = q.device
    # Nothing can be read back to the host while a CUDA graph is captured: the checks that need tensor values then
    # run on the device instead (_device_check), in stream order before any write.
    capturing = _capturing(device)
    paged = block_table is not None
    if paged:
        block_table = validation.tensor("block_table", block_table, 2)
        if block_table.dtype != torch.int32 or block_table.shape[0] != batch or block_table.device != device:
            raise InvalidArgumentError(
                f"block_table must be int32 ({batch}, max_blocks) on {device}, got {block_table.dtype} "
                f"{tuple(block_table.shape)} on {block_table.device}"
            )
        if cache_batch_idx is not None:
            raise InvalidArgumentError("cache_batch_idx cannot be combined with block_table (a paged cache)")
        page_size = k_cache.shape[1]
        if page_size % 16:
            raise InvalidArgumentError(f"paged cache page size is {page_size}; allowed: a multiple of 16")
        capacity = block_table.shape[1] * page_size
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] != batch:
            raise InvalidArgumentError(
                f"k_cache has {k_cache.shape[0]} rows but q has batch {batch}; pass cache_batch_idx to pick rows"
            )
        if cache_batch_idx is not None:
            cache_batch_idx = _int32_vector("cache_batch_idx", cache_batch_idx, batch, device)
            if capturing:
                rows_ok = ((cache_batch_idx >= 0) & (cache_batch_idx < k_cache.shape[0])).all()
                if k is not None:
                    ordered = cache_batch_idx.sort().values
                    rows_ok = rows_ok & (ordered[1:] != ordered[:-1]).all()
                _device_check(rows_ok, f"cache_batch_idx has entries outside [0, {k_cache.shape[0]}) or repeats a row")
            else:
                idx = cache_batch_idx.tolist()
                if any(not 0 <= i < k_cache.shape[0] for i in idx):
                    raise InvalidArgumentError(f"cache_batch_idx={idx} has entries outside [0, {k_cache.shape[0]})")
                if k is not None and len(set(idx)) != len(idx):
                    raise InvalidArgumentError(
                        f"cache_batch_idx={idx} repeats a row; appends would overwrite each other"
                    )
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
    if cache_seqlens is None:
        if k is not None:
            raise InvalidArgumentError("cache_seqlens is required when appending k/v (where would they go?)")
        lengths = [capacity] * batch
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lengths = [cache_seqlens] * batch
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    else:
        cache_seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, device)
        # A device sync: the checks below must see the lengths before anything is read or written. Lengths given
        # as an int (or left to the cache's capacity) are known on the host and cost none, so a decode step
        # does not wait for the previous one to finish.
        lengths = None if capturing else cache_seqlens.tolist()
    if lengths is None:
        longest = capacity - seqlen_new  # for the dispatch spec: the most a row may hold
        _device_check(
            ((cache_seqlens >= 0) & (cache_seqlens <= capacity - seqlen_new)).all(),
            f"cache_seqlens has negative entries or a row without room for {seqlen_new} more tokens (capacity "
            f"{capacity})",
        )
    else:
        # min/max run in C: a decode batch of hundreds of rows costs no Python loop per call.
        longest = max(lengths, default=0)
        if lengths and min(lengths) < 0:
            raise InvalidArgumentError(f"cache_seqlens={lengths} has negative entries")
        if longest + seqlen_new > capacity:
            b = lengths.index(longest)
            raise KVCacheOverflowError(
                f"cache row {b} holds {lengths[b]} tokens; appending {seqlen_new} would need "
                f"{lengths[b] + seqlen_new} slots but the cache has room for {capacity}"
            )
    if paged:
        num_blocks = k_cache.shape[0]
        page_size = k_cache.shape[1]
        # One vectorised check (a single device sync) over the pages each row will touch.
        pages_needed = (cache_seqlens.long() + seqlen_new + page_size - 1) // page_size
        touched = torch.arange(block_table.shape[1], device=device)[None, :] < pages_needed[:, None]
        bad_rows = (touched & ((block_table < 0) | (block_table >= num_blocks))).any(dim=1)
        if capturing:
            _device_check(~bad_rows.any(), f"block_table uses pages outside [0, {num_blocks})")
        elif bool(bad_rows.any()):
            b = int(bad_rows.nonzero()[0, 0])
            used = block_table[b, : int(pages_needed[b])].tolist()
            raise InvalidArgumentError(f"block_table[{b}] uses pages {used} outside [0, {num_blocks})")

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

    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None or k is None:
            raise InvalidArgumentError("rotary needs rotary_cos, rotary_sin and new k/v together")
        rotary_cos = validation.tensor("rotary_cos", rotary_cos, 2)
        rotary_sin = validation.tensor("rotary_sin", rotary_sin, 2)
        if rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > head_dim:
            raise InvalidArgumentError(
                f"rotary_cos/sin must share a shape (seqlen_ro, rotary_dim/2) with rotary_dim <= {head_dim}, got "
                f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        per_query = params.is_masked
        reach = max(seqlen_new, seqlen_q if per_query else 1)
        if lengths is None:
            _device_check((cache_seqlens + reach <= rotary_cos.shape[0]).all(),
                          f"rotary_cos has {rotary_cos.shape[0]} positions; a row needs more")  # fmt: skip
        elif rotary_cos.shape[0] < longest + reach:
            raise InvalidArgumentError(
                f"rotary_cos has {rotary_cos.shape[0]} positions; this call needs {longest + reach}"
            )
        base = cache_seqlens.long()[:, None]
        k_pos = base + torch.arange(seqlen_new, device=device)[None, :]
        q_pos = base + (torch.arange(seqlen_q, device=device)[None, :] if per_query else 0)
        q_pos = q_pos.expand(batch, seqlen_q)
        k = apply_rotary(k, rotary_cos[k_pos], rotary_sin[k_pos], rotary_interleaved)
        q = apply_rotary(q, rotary_cos[q_pos], rotary_sin[q_pos], rotary_interleaved)

    if k is not None and seqlen_new:
        _append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    total = cache_seqlens if not seqlen_new else (cache_seqlens + seqlen_new).to(torch.int32)

    chosen = _common.choose(
        "paged_kvcache" if paged else "kvcache",
        backend,
        q=q,
        head_dim_v=v_cache.shape[-1],
        num_heads_k=k_cache.shape[2],
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=longest + seqlen_new if batch else 0,
        params=params,
        alibi=slopes is not None,
        requires_grad=False,
        extra_features=fp8.features(scales),
    )
    if q.shape[-1] and q.stride(-1) != 1:
        q = q.contiguous()
    if scales is not None:
        out, lse = _fp8_library.kvcache_forward(
            q, k_cache, v_cache, total, cache_batch_idx, block_table, slopes, params, scales, chosen
        )
        return (out, lse) if return_lse else out
    out, lse = _library.kvcache_forward(
        q, k_cache, v_cache, total, cache_batch_idx, block_table, slopes,
        params.softmax_scale, params.causal, params.window_left, params.window_right, params.softcap, chosen,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_check(ok: torch.Tensor, message: str) -> None:
    """A check whose inputs stay on the device (CUDA-graph capture): it runs in stream order before the writes
    that follow, and a failure stops the GPU with a device-side assert instead of raising here."""
    torch._assert_async(ok, f"attention_with_kvcache: {message}")


def _append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table) -> None:
    batch, seqlen_new = k.shape[:2]
    device = k.device
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=device)[None, :]  # (B, S_new)
    with torch.no_grad():
        if block_table is not None:
            page_size = k_cache.shape[1]
            pages = torch.gather(block_table.long(), 1, pos // page_size)
            k_cache[pages, pos % page_size] = k.to(k_cache.dtype)
            v_cache[pages, pos % page_size] = v.to(v_cache.dtype)
        else:
            rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch, device=device)
            rows = rows[:, None].expand(batch, seqlen_new)
            k_cache[rows, pos] = k.to(k_cache.dtype)
            v_cache[rows, pos] = v.to(v_cache.dtype)
