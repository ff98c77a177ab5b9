"""flash-attn 2.8's ``flash_attn_interface`` functions, computed by attnkit.

Return convention (flash-attn's): ``out``, or with ``return_attn_probs=True`` the triple ``(out, softmax_lse,
None)``: attnkit never materialises the probability matrix, so the third entry (flash-attn's ``S_dmask``, documented
there as "for testing only" and often wrong in scale) is None. ``flash_attn_with_kvcache`` returns ``out`` or
``(out, softmax_lse)`` with ``return_softmax_lse=True``.
"""

from __future__ import annotations

import torch

from ... import validation
from ...errors import InvalidArgumentError, InvalidArgumentTypeError
from ...ops.attention import attention
from ...ops.kvcache import attention_with_kvcache
from ...ops.varlen import attention_varlen


def _result(out_lse: tuple[torch.Tensor, torch.Tensor], return_attn_probs: bool):
    out, lse = out_lse
    return (out, lse, None) if return_attn_probs else out


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentTypeError(f"{name} must be a bool, got {value!r}")
    return value


def _packed(name: str, x: object, ndim: int, axis: int, count: int) -> tuple[torch.Tensor, ...]:
    x = validation.tensor(name, x, ndim)
    if x.shape[axis] != count:
        raise InvalidArgumentError(f"{name} must have size {count} in dimension {axis}, got shape {tuple(x.shape)}")
    return x.unbind(axis)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``; see
    :func:`attnkit.attention` for the semantics (bottom-right causal, windows, softcap, ALiBi, dropout)."""
    return _result(
        attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic, return_lse=True,
        ),
        _flag("return_attn_probs", return_attn_probs),
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(batch, seqlen, 3, nheads, headdim)``."""
    q, k, v = _packed("qkv", qkv, 5, 2, 3)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(batch, seqlen_q, nheads, headdim)``, kv ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    k, v = _packed("kv", kv, 5, 2, 2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


def _paged_to_packed(name: str, cache: torch.Tensor, block_table: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """The keys (or values) of every sequence of a paged cache, packed back to back as ``cu_seqlens_k`` says.

    A differentiable gather: gradients flow back into the pages that were read.
    """
    cache = validation.tensor(name, cache, 4)
    page = cache.shape[1]
    rows = []
    for b in range(len(offsets) - 1):
        length = offsets[b + 1] - offsets[b]
        pages = block_table[b, : (length + page - 1) // page].long()
        rows.append(cache[pages].reshape(-1, *cache.shape[2:])[:length])
    return torch.cat(rows) if rows else cache.new_empty((0, *cache.shape[2:]))


def _check_block_table(block_table: object, batch: int, num_blocks: int, offsets: list[int], page: int) -> torch.Tensor:
    if not isinstance(block_table, torch.Tensor):
        raise InvalidArgumentTypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise InvalidArgumentError(
            f"block_table must be int32 of shape ({batch}, max_blocks), got {block_table.dtype} "
            f"{tuple(block_table.shape)}"
        )
    longest = max((offsets[b + 1] - offsets[b] for b in range(batch)), default=0)
    if (longest + page - 1) // page > block_table.shape[1]:
        raise InvalidArgumentError(
            f"block_table has {block_table.shape[1]} pages per row but a sequence of {longest} keys needs "
            f"{(longest + page - 1) // page} pages of {page}"
        )
    used = [block_table[b, : (offsets[b + 1] - offsets[b] + page - 1) // page] for b in range(batch)]
    if used:
        flat = torch.cat(used)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_blocks):
            raise InvalidArgumentError(f"block_table entries must be in [0, {num_blocks}), got {flat.tolist()}")
    return block_table


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)``, or with ``block_table``
    (int32 ``(batch, max_blocks)``) paged caches ``(num_blocks, page_size, nheads_k, headdim)`` whose sequence
    ``b`` holds ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys in the pages its row lists. See
    :func:`attnkit.attention_varlen`."""
    if block_table is not None:
        if not isinstance(cu_seqlens_k, torch.Tensor):
            raise InvalidArgumentTypeError(f"cu_seqlens_k must be a torch.Tensor, got {type(cu_seqlens_k).__name__}")
        offsets = [int(x) for x in cu_seqlens_k.tolist()]
        k = validation.tensor("k", k, 4)
        v = validation.tensor("v", v, 4)
        if k.shape[:2] != v.shape[:2]:
            raise InvalidArgumentError(f"paged k and v must share (num_blocks, page_size), got {k.shape} and {v.shape}")
        block_table = _check_block_table(block_table, len(offsets) - 1, k.shape[0], offsets, k.shape[1])
        packed_cu = torch.tensor(
            [o - offsets[0] for o in offsets], dtype=torch.int32, device=cu_seqlens_k.device
        )  # the gathered keys start at row 0
        k = _paged_to_packed("k", k, block_table, offsets)
        v = _paged_to_packed("v", v, block_table, offsets)
        cu_seqlens_k = packed_cu
    return _result(
        attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
            softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
            dropout_p=dropout_p, deterministic=deterministic, return_lse=True,
        ),
        _flag("return_attn_probs", return_attn_probs),
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(total, 3, nheads, headdim)``."""
    q, k, v = _packed("qkv", qkv, 4, 1, 3)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(total_q, nheads, headdim)``, kv ``(total_k, 2, nheads_k, headdim)``."""
    k, v = _packed("kv", kv, 4, 1, 2)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """See :func:`attnkit.attention_with_kvcache` (same order of checks, append and attention).

    ``cache_leftpad`` (int32 ``(batch,)``): row ``b``'s tokens start at slot ``cache_leftpad[b]`` of its cache
    row: keys before it are ignored, and positions (masks, rotary) count from it, so the row behaves exactly like a
    cache whose row starts there. Not with ``block_table`` (as in flash-attn). ``num_splits`` is flash-attn's
    tuning knob for its split-KV kernel (0: its heuristic); attnkit's backends choose their split themselves, so it
    only has to be a non-negative int.
    """
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise InvalidArgumentError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    return_lse = _flag("return_softmax_lse", return_softmax_lse)
    kw = dict(
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
        return_lse=True,
    )  # fmt: skip
    if cache_leftpad is None:
        result = attention_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
            block_table=block_table, **kw,
        )  # fmt: skip
    else:
        result = _with_leftpad(
            q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, kw
        )  # fmt: skip
    out, lse = result
    return (out, lse) if return_lse else out


def _with_leftpad(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, kw):
    """One attention_with_kvcache call per batch row on the view of its cache row that starts at the left pad, so
    appends land in the real cache and every position is relative to the pad."""
    if block_table is not None:
        raise InvalidArgumentError("cache_leftpad cannot be combined with block_table (paged KV), as in flash-attn")
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    batch = q.shape[0]
    if not isinstance(cache_leftpad, torch.Tensor):
        raise InvalidArgumentTypeError(f"cache_leftpad must be a torch.Tensor, got {type(cache_leftpad).__name__}")
    if cache_leftpad.dtype != torch.int32 or tuple(cache_leftpad.shape) != (batch,):
        raise InvalidArgumentError(
            f"cache_leftpad must be int32 of shape ({batch},), got {cache_leftpad.dtype} {tuple(cache_leftpad.shape)}"
        )
    pads = [int(x) for x in cache_leftpad.tolist()]
    if cache_seqlens is None:
        raise InvalidArgumentError("cache_leftpad needs cache_seqlens (where each row's tokens end)")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
            raise InvalidArgumentError(
                f"cache_seqlens must be int32 of shape ({batch},), got {cache_seqlens.dtype} "
                f"{tuple(cache_seqlens.shape)}"
            )
        lengths = [int(x) for x in cache_seqlens.tolist()]
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lengths = [cache_seqlens] * batch
    else:
        raise InvalidArgumentTypeError(f"cache_seqlens must be an int or an int32 tensor, got {cache_seqlens!r}")
    rows = [int(x) for x in cache_batch_idx.tolist()] if cache_batch_idx is not None else list(range(batch))
    for b, (pad, length) in enumerate(zip(pads, lengths)):
        if not 0 <= pad <= length:
            raise InvalidArgumentError(f"cache_leftpad[{b}] = {pad} must be in [0, cache_seqlens[{b}] = {length}]")
        if not 0 <= rows[b] < k_cache.shape[0]:
            raise InvalidArgumentError(f"cache_batch_idx[{b}] = {rows[b]} is outside [0, {k_cache.shape[0]})")
    slopes = kw.pop("alibi_slopes")
    per_row_slopes = isinstance(slopes, torch.Tensor) and slopes.dim() == 2
    outs, lses = [], []
    for b in range(batch):
        row, pad = rows[b], pads[b]
        o, l = attention_with_kvcache(
            q[b : b + 1], k_cache[row : row + 1, pad:], v_cache[row : row + 1, pad:],
            None if k is None else k[b : b + 1], None if v is None else v[b : b + 1],
            cache_seqlens=lengths[b] - pad, alibi_slopes=slopes[b : b + 1] if per_row_slopes else slopes, **kw,
        )  # fmt: skip
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
