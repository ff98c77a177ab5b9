"""attnkit.distributed in this process: a one-rank gloo group, argument errors, and the transport choices that do
not need a GPU (NCCL groups are recognised and given CUDA tensors only; peers are addressed by global rank)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from helpers import qkv, rand

import attnkit
import attnkit.distributed as cp
from attnkit.distributed import _api, _comm
from attnkit.errors import InvalidArgumentError, InvalidArgumentTypeError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def _grads(out, *xs):
    dout = rand(*out.shape, dtype=out.dtype, seed=99)
    return torch.autograd.grad(out, xs, dout)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"window_size": (3, 2), "softcap": 1.5},
        # One rank: the only block is the whole sequence, so even bidirectional ALiBi is exact.
        {"alibi_slopes": torch.tensor([0.3, 0.1, 0.2, 0.05])},
        {"causal": True, "window_size": (4, 0), "alibi_slopes": torch.tensor([0.3, 0.1, 0.2, 0.05])},
    ],
)
def test_one_rank_is_plain_attention(group, strategy, layout, kw):
    q, k, v = qkv(2, 14, 14, 4, 2, 8, 6, requires_grad=True)
    ref, ref_lse = attnkit.attention(q, k, v, return_lse=True, **kw)
    out, lse = cp.ring_attention(q, k, v, group=group, layout=layout, strategy=strategy, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    for a, b in zip(_grads(out, q, k, v), _grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_one_rank_varlen_is_attention_varlen(group):
    q, k, v = (x[0] for x in qkv(1, 13, 13, 4, 2, 8, requires_grad=True))
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)  # an empty sequence and two padding rows
    ref = attnkit.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)
    out = cp.ring_attention_varlen(q, k, v, cu, group=group, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert out[11:].abs().max() == 0


def test_empty_input_gives_zeros(group):
    q, k, v = qkv(0, 4, 4, 2, 2, 8, requires_grad=True)
    out, lse = cp.ring_attention(q, k, v, group=group, return_lse=True)
    assert out.shape == (0, 4, 2, 8) and lse.shape == (0, 2, 4)
    q, k, v = qkv(1, 0, 0, 2, 2, 8, requires_grad=True)
    out = cp.ring_attention(q, k, v, group=group)
    assert out.shape == (1, 0, 2, 8)


def test_loopback_ring_runs_the_same_blocks(group):
    q, k, v = qkv(1, 12, 12, 2, 2, 8)
    kw = dict(
        group=group,
        causal=True,
        softmax_scale=None,
        layout="zigzag",
        window_size=(-1, -1),
        alibi_slopes=None,
        softcap=0.0,
        deterministic=False,
        strategy="ring",
        return_lse=False,
        backend="auto",
    )
    # On one rank the ring never sends anything, so the stand-in must give the very same result.
    assert torch.equal(_api._dense(q, k, v, loopback=True, **kw), cp.ring_attention(q, k, v, group=group, causal=True))


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (
            lambda q, k, v, g: cp.ring_attention(q, k[:, :6], v[:, :6], group=g),
            InvalidArgumentError,
            ["k has local sequence length 6", "q has 10"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group=g, layout="striped"),
            InvalidArgumentError,
            ["layout is 'striped'", "'zigzag'"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group=g, strategy="tree"),
            InvalidArgumentError,
            ["strategy is 'tree'", "'allgather'"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group="world"),
            InvalidArgumentTypeError,
            ["group must be", "str"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q[:, :5], k[:, :5], v[:, :5], group=g),
            InvalidArgumentError,
            ["local sequence length 5", "even"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group=g, window_size=(-2, 0)),
            InvalidArgumentError,
            ["window_size[0]"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group=g, deterministic=1),
            InvalidArgumentTypeError,
            ["deterministic"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q, k, v, group=g, return_lse="yes"),
            InvalidArgumentTypeError,
            ["return_lse"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention(q[0], k, v, group=g),
            InvalidArgumentError,
            ["q must have 4 dimensions"],
        ),
        (
            lambda q, k, v, g: cp.shard(q[:, :5], g, "zigzag"),
            InvalidArgumentError,
            ["sequence length 5", "2 * world_size = 2"],
        ),
        (lambda q, k, v, g: cp.shard(q, g, "zigzag", dim=4), InvalidArgumentError, ["dim is 4"]),
        (
            lambda q, k, v, g: cp.unshard(q[:, :5], g, "zigzag"),
            InvalidArgumentError,
            ["local sequence length 5"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention_varlen(
                q[0], k[0, :9], v[0, :9], torch.tensor([0, 9], dtype=torch.int32), group=g
            ),
            InvalidArgumentError,
            ["k has 9 local rows"],
        ),
        (
            lambda q, k, v, g: cp.ring_attention_varlen(
                q[0], k[0], v[0], torch.tensor([0, 11], dtype=torch.int32), group=g
            ),
            InvalidArgumentError,
            ["cu_seqlens ends at 11"],
        ),
    ],
)
def test_bad_arguments_name_what_is_wrong(group, call, exc, words):
    q, k, v = qkv(1, 10, 10, 2, 2, 8)
    before = [x.clone() for x in (q, k, v)]
    with pytest.raises(exc) as info:
        call(q, k, v, group)
    for word in words:
        assert word in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_uninitialized_torch_distributed_is_reported(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    q, k, v = qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(InvalidArgumentError, match="not initialized"):
        cp.ring_attention(q, k, v)


# ---- transport choices (no GPU needed) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "device", "ok"),
    [
        ("nccl", "cuda:0", True),
        ("nccl", "cpu", False),
        ("gloo", "cpu", True),
        ("gloo", "cuda:0", False),
        ("cpu:gloo,cuda:nccl", "cpu", True),
        ("cpu:gloo,cuda:nccl", "cuda:1", True),
        ("cuda:nccl", "cpu", False),
        ("ucc", "cuda:0", True),  # backends attnkit knows nothing about are left to torch
        ("mpi", "cpu", True),
    ],
)
def test_device_must_suit_the_group_backend(backend, device, ok):
    if ok:
        _comm.check_device(backend, torch.device(device))
    else:
        with pytest.raises(InvalidArgumentError, match="q is on"):
            _comm.check_device(backend, torch.device(device))


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_nccl_group_rejects_cpu_tensors_before_communicating(group, monkeypatch, strategy):
    monkeypatch.setattr(dist, "get_backend", lambda g=None: "nccl")

    def no_communication(*args, **kwargs):
        raise AssertionError("communicated before rejecting the call")

    for name in ("batch_isend_irecv", "all_gather_into_tensor", "all_to_all_single"):
        monkeypatch.setattr(dist, name, no_communication)
    monkeypatch.setattr(dist, "all_gather_single", no_communication, raising=False)
    q, k, v = qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(InvalidArgumentError, match="'nccl', which carries cuda tensors"):
        cp.ring_attention(q, k, v, group=group, strategy=strategy)
    with pytest.raises(InvalidArgumentError, match="x is on cpu but the process group uses 'nccl'"):
        cp.unshard(q, group)


def test_mixed_backend_group_serves_cpu_tensors_through_gloo(group, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda g=None: "cpu:gloo,cuda:nccl")
    q, k, v = qkv(1, 8, 8, 2, 2, 8)
    torch.testing.assert_close(
        cp.ring_attention(q, k, v, group=group, strategy="allgather"), attnkit.attention(q, k, v)
    )


def test_ring_shift_sends_to_the_next_global_rank(monkeypatch):
    """Group rank g is global rank 10 + 2g: the ops must name global ranks, batched in one call."""
    recorded = []
    monkeypatch.setattr(dist, "get_global_rank", lambda grp, r: 10 + 2 * r)
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, grp: (op, t, peer, grp))

    class Work:
        waited = 0

        def wait(self):
            Work.waited += 1

    def batch(ops):
        recorded.append(ops)
        return [Work() for _ in ops]

    monkeypatch.setattr(dist, "batch_isend_irecv", batch)
    ring = _comm.Ring(group="G", rank=1, world=4)  # type: ignore[arg-type]
    k = torch.arange(12.0).reshape(2, 3, 2)[:, ::2]  # not contiguous: sent as a contiguous copy
    pending = ring.shift([k, torch.ones(2)])
    (ops,) = recorded
    assert [(op, peer) for op, _, peer, _ in ops] == [
        (dist.isend, 14),
        (dist.isend, 14),
        (dist.irecv, 10),
        (dist.irecv, 10),
    ]
    assert all(grp == "G" for *_, grp in ops)
    assert torch.equal(ops[0][1], k) and ops[0][1].is_contiguous()
    received = pending.wait()
    assert Work.waited == 4
    assert [r.shape for r in received] == [k.shape, (2,)]
    assert received[0] is ops[2][1] and received[1] is ops[3][1]


def test_ring_blocks_ask_dispatch_for_a_merged_backward(group, monkeypatch):
    seen = []
    real = attnkit.dispatch.decide

    def spy(*args):  # (token, op, device, ..., feature_bits, requires_grad, merged_backward)
        seen.append((args[-1], args[-2]))
        return real(*args)

    monkeypatch.setattr(attnkit.dispatch, "decide", spy)
    q, k, v = qkv(1, 8, 8, 2, 2, 8, requires_grad=True)
    cp.ring_attention(q, k, v, group=group, causal=True)
    cp.ring_attention(q, k, v, group=group, causal=True, strategy="allgather")  # each block's own out/lse
    with torch.no_grad():
        cp.ring_attention(q, k, v, group=group, causal=True)
    assert seen == [(True, True), (False, True), (False, False)]
