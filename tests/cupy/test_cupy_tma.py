"""The tensor-map description checks of backends/cupy/tma.py (pure Python; the driver call needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from attnkit.backends.cupy import tma

from attnkit.errors import InvalidArgumentError


def test_bf16_kv_map_in_driver_terms():
    # K of shape (batch 2, seqlen 1000, heads 8, dim 128), contiguous: dims innermost first.
    args = tma.tiled_arguments(
        0x10000, torch.bfloat16, (128, 1000, 8, 2), (8 * 128, 128, 1000 * 8 * 128), (64, 128, 1, 1)
    )
    assert args.data_type == 9
    assert args.dims == (128, 1000, 8, 2)
    assert args.strides_bytes == (2048, 256, 2048000)
    assert args.box == (64, 128, 1, 1)
    assert args.swizzle == 3


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"address": 0x10008}, "16-byte aligned"),
        ({"strides": (8 * 100 + 4, 100, 10**6)}, "multiple of 16"),
        ({"box": (128, 128, 1, 1)}, "swizzle span"),
        ({"box": (64, 300, 1, 1)}, "box dim 1"),
        ({"box": (4, 128, 1, 1)}, "multiple of 16 bytes"),
        ({"dims": (128, 0, 8, 2)}, "dim 1 has size 0"),
        ({"strides": (1024, 128)}, "rank"),
        ({"swizzle_bytes": 48}, "swizzle_bytes=48"),
        ({"dtype": torch.int64}, "TMA dtype"),
    ],
)
def test_rule_breaks_are_named(kwargs, needle):
    base = {
        "address": 0x10000,
        "dtype": torch.bfloat16,
        "dims": (128, 1000, 8, 2),
        "strides": (8 * 128, 128, 1000 * 8 * 128),
        "box": (64, 128, 1, 1),
        "swizzle_bytes": 128,
    }
    base.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=needle):
        tma.tiled_arguments(**base)


def test_unswizzled_inner_box_may_exceed_128_bytes():
    args = tma.tiled_arguments(0, torch.float16, (256, 64), (256,), (256, 64), swizzle_bytes=0)
    assert args.swizzle == 0 and args.box == (256, 64)


def test_kernel_argument_is_128_bytes():
    dt = tma._kernel_arg_dtype()
    assert dt.itemsize == tma.TENSOR_MAP_BYTES
