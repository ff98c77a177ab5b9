"""The frontend's per-key cache of checked ``attention`` calls (attnkit.ops._fastcall): a repeated call reuses
the decision, gives the full path's results, still refuses what the full path refuses, and goes through the
custom op whenever something else may be watching (grad, torch function modes)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import attnkit
from attnkit import dispatch
from attnkit.errors import InvalidArgumentError, InvalidArgumentTypeError
from attnkit.ops import _fastcall


@pytest.fixture(autouse=True)
def _fresh():
    _fastcall.clear()
    yield
    _fastcall.clear()


def _qkv(grad=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 37, 4, 16, generator=gen, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def test_repeated_call_reuses_the_decision(monkeypatch):
    q, k, v = _qkv()
    first = attnkit.attention(q, k, v, causal=True, backend="reference")
    assert len(_fastcall._ATTENTION) == 1
    decided = []
    monkeypatch.setattr(dispatch, "decide", lambda *a, **kw: decided.append(a) or "reference")
    second = attnkit.attention(q, k, v, causal=True, backend="reference")
    assert not decided and torch.equal(first, second)
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    attnkit.attention(q, k, v, causal=True, backend="reference")
    assert decided  # the switch: the full path again


@pytest.mark.parametrize(
    "bad,error",
    [
        (dict(causal=1), InvalidArgumentTypeError),
        (dict(window_size=(True, 0)), InvalidArgumentError),
        (dict(softmax_scale=float("nan")), InvalidArgumentError),
        (dict(return_lse=1), InvalidArgumentTypeError),
        (dict(deterministic=0), InvalidArgumentTypeError),
    ],
    ids=str,
)
def test_bad_options_still_raise_after_a_cached_call(bad, error):
    q, k, v = _qkv()
    good = dict(causal=True, window_size=(1, 0), softmax_scale=0.5, return_lse=True, deterministic=False)
    attnkit.attention(q, k, v, backend="reference", **good)
    with pytest.raises(error):
        attnkit.attention(q, k, v, backend="reference", **{**good, **bad})


def test_keys_separate_what_the_decision_depends_on():
    q, k, v = _qkv()
    attnkit.attention(q, k, v, backend="reference")
    attnkit.attention(q[:, :20], k, v, backend="reference")  # shape
    attnkit.attention(q.double(), k.double(), v.double(), backend="reference")  # dtype
    with attnkit.use_backend("reference"):
        attnkit.attention(q, k, v)  # the context
    assert len(_fastcall._ATTENTION) == 4
    with pytest.raises((InvalidArgumentError, InvalidArgumentTypeError)):  # a mismatched dtype: still checked
        attnkit.attention(q, k.double(), v, backend="reference")


def test_gradients_match_the_full_path(monkeypatch):
    grads = []
    for fast in ("1", "1", "0"):
        monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", fast)
        q, k, v = _qkv(grad=True)
        attnkit.attention(q, k, v, causal=True, backend="reference").square().sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], got))


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_op_runs_when_a_mode_watches():
    """Plain eager calls skip the dispatcher; under a torch function mode the attnkit op is still called."""
    q, k, v = _qkv()
    first = attnkit.attention(q, k, v, backend="reference")
    with _Recorder() as mode:
        second = attnkit.attention(q, k, v, backend="reference")
    assert any("attnkit" in op for op in mode.ops) and torch.equal(first, second)


def test_registry_change_drops_old_decisions():
    q, k, v = _qkv()
    attnkit.attention(q, k, v, backend="reference")
    key_count = len(_fastcall._ATTENTION)
    generation = attnkit.registry.REGISTRY.generation
    attnkit.register_backend("fastcall_probe", type(attnkit.registry.REGISTRY.get("reference")))
    try:
        assert attnkit.registry.REGISTRY.generation != generation
        attnkit.attention(q, k, v, backend="reference")
        assert len(_fastcall._ATTENTION) == key_count + 1  # a new key: the old entry is never found again
    finally:
        attnkit.registry.REGISTRY.unregister("fastcall_probe")


def _decode(gen, batch=2, capacity=40):
    q = torch.randn(batch, 1, 4, 16, generator=gen)
    k_cache, v_cache = (torch.randn(batch, capacity, 2, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(batch, 1, 2, 16, generator=gen) for _ in range(2))
    return q, k_cache, v_cache, k, v


@pytest.mark.parametrize("lengths", ["int", "tensor"])
def test_kvcache_repeated_steps_match_the_full_path(monkeypatch, lengths):
    """Decode steps through the cached decision write and return what the full path does; lengths are checked
    on every step (an overflow after cached steps still raises and writes nothing)."""
    from attnkit.errors import KVCacheOverflowError

    results = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", fast)
        _fastcall.clear()
        q, k_cache, v_cache, k, v = _decode(torch.Generator().manual_seed(4))
        outs = []
        for step in range(3):
            n = 30 + step
            lens = n if lengths == "int" else torch.full((2,), n, dtype=torch.int32)
            outs.append(attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True,
                                                       backend="reference"))  # fmt: skip
        results[fast] = (outs, k_cache, v_cache)
        if fast == "1":
            assert len(_fastcall._KVCACHE) == 1
        before = (k_cache.clone(), v_cache.clone())
        full = 40 if lengths == "int" else torch.full((2,), 40, dtype=torch.int32)
        with pytest.raises(KVCacheOverflowError):
            attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=full, backend="reference")
        assert torch.equal(before[0], k_cache) and torch.equal(before[1], v_cache)
    (a_out, a_k, a_v), (b_out, b_k, b_v) = results["1"], results["0"]
    assert torch.equal(a_k, b_k) and torch.equal(a_v, b_v)
    assert all(torch.equal(x, y) for x, y in zip(a_out, b_out))


def test_kvcache_key_covers_the_caches_addresses():
    """A new cache tensor (same layout) is a new key: its aliasing check runs again."""
    gen = torch.Generator().manual_seed(5)
    q, k_cache, v_cache, k, v = _decode(gen)
    attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3, backend="reference")
    with pytest.raises(InvalidArgumentError, match="share memory"):
        attnkit.attention_with_kvcache(q, k_cache, k_cache, k, v, cache_seqlens=3, backend="reference")
