"""``attnkit.nn``: attention layers on attnkit's operators.

:class:`MultiheadAttention` takes flash-attn's ``MHA`` arguments where they apply (self-attention with a fused
QKV projection, GQA/MQA through ``num_heads_kv``, rotary, ALiBi, sliding windows, dropout) and decodes
incrementally through :func:`attnkit.attention_with_kvcache` with a cache from :meth:`allocate_kv_cache`.

State dict (flash-attn's layout, so weights move between the two):

* ``Wqkv.weight`` ``((num_heads + 2 * num_heads_kv) * head_dim, embed_dim)`` (and ``Wqkv.bias``): output
  channels are the query heads, then the key heads, then the value heads, each ``head_dim`` wide;
* ``out_proj.weight`` ``(embed_dim, num_heads * head_dim)`` (and ``out_proj.bias``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import InvalidArgumentError
from .ops.attention import attention
from .ops.kvcache import attention_with_kvcache
from .ops.rotary import apply_rotary


class KVCache:
    """Keys and values of one layer for ``batch_size`` rows of up to ``max_seqlen`` tokens.

    ``seqlen`` counts the tokens already stored (the same for every row); each forward with the cache appends its
    tokens in place and advances it. ``reset()`` starts over without reallocating.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v
        self.seqlen = 0

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.seqlen = 0


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's head slopes (geometric from 2^(-8/n); interleaved for head counts that are not powers of 2)."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = powers(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = powers(closest) + powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class MultiheadAttention(nn.Module):
    """Self-attention: fused QKV projection, attnkit attention, output projection.

    Args:
        embed_dim: model width; ``embed_dim % num_heads == 0`` and ``head_dim = embed_dim // num_heads``.
        num_heads: query heads. num_heads_kv: key/value heads (default ``num_heads``; must divide it).
        qkv_proj_bias, out_proj_bias: biases of the two projections.
        dropout: attention dropout, applied in training mode only.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: causal self-attention (needed for incremental decoding to equal the full forward).
        layer_idx: kept for flash-attn compatibility (caches are passed explicitly here).
        rotary_emb_dim: rotate the first ``rotary_emb_dim`` channels of q and k (0: no rotary);
            rotary_emb_base: its frequency base; rotary_emb_interleaved: pairs (0,1),(2,3)... instead of halves.
        use_alibi: ALiBi biases with :func:`alibi_slopes`.
        window_size: ``(left, right)`` sliding window, -1 = unbounded.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        use_alibi: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if embed_dim % num_heads:
            raise InvalidArgumentError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_heads_kv < 1 or num_heads % num_heads_kv:
            raise InvalidArgumentError(f"num_heads_kv={num_heads_kv} must divide num_heads={num_heads}")
        head_dim = embed_dim // num_heads
        if rotary_emb_dim % 2 or not 0 <= rotary_emb_dim <= head_dim:
            raise InvalidArgumentError(f"rotary_emb_dim={rotary_emb_dim} must be even and in [0, {head_dim}]")
        self.embed_dim, self.num_heads, self.num_heads_kv, self.head_dim = embed_dim, num_heads, num_heads_kv, head_dim
        self.dropout, self.softmax_scale, self.causal = dropout, softmax_scale, causal
        self.layer_idx, self.window_size = layer_idx, tuple(window_size)
        self.rotary_emb_dim, self.rotary_emb_interleaved = rotary_emb_dim, rotary_emb_interleaved
        factory = dict(device=device, dtype=dtype)
        self.Wqkv = nn.Linear(embed_dim, (num_heads + 2 * num_heads_kv) * head_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        if rotary_emb_dim:
            exponents = torch.arange(0, rotary_emb_dim, 2, dtype=torch.float32) / rotary_emb_dim
            inv_freq = 1.0 / rotary_emb_base**exponents
            self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("alibi", alibi_slopes(num_heads).to(device) if use_alibi else None, persistent=False)

    def allocate_kv_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty cache for ``batch_size`` rows of ``max_seqlen`` tokens (the projection's dtype and device)."""
        weight = self.Wqkv.weight
        shape = (batch_size, max_seqlen, self.num_heads_kv, self.head_dim)
        kw = dict(dtype=dtype or weight.dtype, device=device or weight.device)
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    def _rotary(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq.to(device))
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x ``(batch, seqlen, embed_dim)`` -> ``(batch, seqlen, embed_dim)``.

        With ``kv_cache`` the new tokens' keys/values are appended to it and the queries attend over everything
        cached (forward only, like :func:`attnkit.attention_with_kvcache`); feeding a prompt and then one token at a
        time gives the full causal forward's outputs.
        """
        batch, seqlen, _ = x.shape
        qkv = self.Wqkv(x).view(batch, seqlen, self.num_heads + 2 * self.num_heads_kv, self.head_dim)
        q = qkv[:, :, : self.num_heads]
        k = qkv[:, :, self.num_heads : self.num_heads + self.num_heads_kv]
        v = qkv[:, :, self.num_heads + self.num_heads_kv :]
        kw = dict(causal=self.causal, softmax_scale=self.softmax_scale, window_size=self.window_size,
                  alibi_slopes=self.alibi)  # fmt: skip
        if kv_cache is None:
            if self.rotary_emb_dim:
                cos, sin = self._rotary(seqlen, x.device)
                q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
                k = apply_rotary(k, cos, sin, self.rotary_emb_interleaved)
            out = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, **kw)
        else:
            rotary = {}
            if self.rotary_emb_dim:
                cos, sin = self._rotary(kv_cache.max_seqlen, x.device)
                rotary = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=self.rotary_emb_interleaved)
            out = attention_with_kvcache(q, kv_cache.k, kv_cache.v, k, v, cache_seqlens=kv_cache.seqlen, **rotary, **kw)
            kv_cache.seqlen += seqlen
        return self.out_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))
