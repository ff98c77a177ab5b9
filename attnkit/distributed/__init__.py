"""Context parallelism on ``torch.distributed``: attention over a sequence sharded across ranks.

>>> out = attnkit.distributed.ring_attention(q_local, k_local, v_local, causal=True)   # zigzag layout
>>> q_local = attnkit.distributed.shard(q, layout="zigzag")                          # this rank's part
>>> out = attnkit.distributed.unshard(out_local, layout="zigzag")                    # the whole sequence

``ring_attention`` (strategies ``"ring"`` and ``"allgather"``), ``ring_attention_varlen`` (packed sequences,
Llama 3 style), ``shard`` / ``unshard``. NCCL process groups for CUDA tensors, gloo for CPU.
"""

from __future__ import annotations

from ._api import STRATEGIES, ring_attention, ring_attention_varlen
from ._layout import LAYOUTS
from ._shard import shard, unshard

__all__ = ["LAYOUTS", "STRATEGIES", "ring_attention", "ring_attention_varlen", "shard", "unshard"]
