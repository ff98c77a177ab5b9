"""Running one planned block through attnkit's custom ops (forward with lse, and the backward op).

The blocks call ``torch.ops.attnkit.attention_forward`` / ``attention_backward`` directly, with the backend that
dispatch picks for each block's own shape and mask, so any backend that runs ``attnkit.attention`` runs a ring.
The backward of a block is given the *merged* output and lse of its query rows: the softmax of the whole row is
``exp(s - lse)``, so each block's ``dq``, ``dk``, ``dv`` are exactly its share of the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..ops import _common, _library
from ..params import AttentionParams
from ._blocks import Block, VarlenCall

Slopes = torch.Tensor | None
Cu = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Options:
    """Resolved options shared by every block: global window (``right == 0`` is causal), scale, softcap."""

    softmax_scale: float
    left: int
    right: int
    softcap: float
    deterministic: bool


def _params(opts: Options, window_left: int, window_right: int) -> AttentionParams:
    return AttentionParams(
        softmax_scale=opts.softmax_scale,
        causal=window_right == 0,
        window_left=window_left,
        window_right=window_right,
        softcap=opts.softcap,
        deterministic=opts.deterministic,
    )


def choose_dense(
    keys: Iterable[tuple[int, int, int, int]],
    backend: str | Sequence[str],
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts: Options,
    alibi: bool,
    requires_grad: bool,
    merged: bool,
) -> dict[tuple[int, int, int, int], str]:
    """Backend for each distinct block shape ``(q_len, k_len, window_left, window_right)``. ``merged``: the blocks'
    results are merged, so each block's backward gets the merged out/lse (the ring strategy)."""
    return {
        key: _common.choose(
            "attention",
            backend,
            q=q,
            head_dim_v=v.shape[-1],
            num_heads_k=k.shape[-2],
            batch=q.shape[0],
            seqlen_q=key[0],
            seqlen_k=key[1],
            params=_params(opts, key[2], key[3]),
            alibi=alibi,
            requires_grad=requires_grad,
            merged_backward=merged,
        )
        for key in sorted(set(keys))
    }


def choose_varlen(
    keys: Iterable[tuple[int, int, int, int, int]],
    backend: str | Sequence[str],
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts: Options,
    alibi: bool,
    requires_grad: bool,
) -> dict[tuple[int, int, int, int, int], str]:
    """Backend for each distinct call shape ``(batch, max_q, max_k, window_left, window_right)``."""
    return {
        key: _common.choose(
            "varlen",
            backend,
            q=q,
            head_dim_v=v.shape[-1],
            num_heads_k=k.shape[-2],
            batch=key[0],
            seqlen_q=key[1],
            seqlen_k=key[2],
            params=_params(opts, key[3], key[4]),
            alibi=alibi,
            requires_grad=requires_grad,
        )
        for key in sorted(set(keys))
    }


def dense_forward(
    blk: Block, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Slopes, opts: Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the block: ``(B, q_len, Hq, Dv)`` in q's dtype and ``(B, Hq, q_len)``."""
    return _library.attention_forward(
        q[:, blk.q_slice], k[:, blk.k_slice], v[:, blk.k_slice], None, None, blk.q_len, blk.k_len, slopes,
        opts.softmax_scale, blk.window_right == 0, blk.window_left, blk.window_right, opts.softcap,
        0.0, 0, opts.deterministic, name,
    )  # fmt: skip


def dense_backward(
    blk: Block,
    name: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    slopes: Slopes,
    opts: Options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's share of ``(dq, dk, dv)``, given the merged ``out``/``lse`` of all local query rows."""
    rows = blk.q_slice
    return _library.attention_backward(
        dout[:, rows], q[:, rows], k[:, blk.k_slice], v[:, blk.k_slice], out[:, rows].contiguous(),
        lse[:, :, rows].contiguous(), None, None, blk.q_len, blk.k_len, slopes,
        opts.softmax_scale, blk.window_right == 0, blk.window_left, blk.window_right, opts.softcap,
        0.0, 0, opts.deterministic, name,
    )  # fmt: skip


def _call_slopes(call: VarlenCall, slopes: Slopes) -> Slopes:
    if slopes is None or slopes.dim() == 1:
        return slopes
    return slopes[list(call.seqs)].contiguous()


def varlen_forward(
    call: VarlenCall,
    name: str,
    cu: Cu,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: Slopes,
    opts: Options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the call: ``(q_len, Hq, Dv)`` and ``(Hq, q_len)``."""
    return _library.attention_forward(
        q[call.q_slice], k[call.k_slice], v[call.k_slice], cu[0], cu[1], call.max_q, call.max_k,
        _call_slopes(call, slopes), opts.softmax_scale, call.window_right == 0, call.window_left,
        call.window_right, opts.softcap, 0.0, 0, opts.deterministic, name,
    )  # fmt: skip


def varlen_backward(
    call: VarlenCall,
    name: str,
    cu: Cu,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    slopes: Slopes,
    opts: Options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The call's share of ``(dq, dk, dv)`` (``dk``/``dv`` for rows ``call.k_slice`` of the gathered keys)."""
    rows = call.q_slice
    return _library.attention_backward(
        dout[rows], q[rows], k[call.k_slice], v[call.k_slice], out[rows].contiguous(), lse[:, rows].contiguous(),
        cu[0], cu[1], call.max_q, call.max_k, _call_slopes(call, slopes), opts.softmax_scale,
        call.window_right == 0, call.window_left, call.window_right, opts.softcap, 0.0, 0, opts.deterministic, name,
    )  # fmt: skip
