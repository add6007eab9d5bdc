"""Memory-bounded exact attention for any additive scheme (KERPLE, FIRE, …): query blocks, each with
its own dense bias ``[H, block, keys]``, never ``[H, N, N]``.

At inference on CPU each block goes through the fused flash kernel with its dense bias as the
mask (about 1.1× an unmasked call; the bias itself is the scheme's cost). In training each block is recomputed in the backward pass (activation checkpointing), so peak extra
memory is one block's ``[B, H, block, keys]`` — linear in N. Causal blocks only read the keys up to
their last query. One decoding query against K cached keys costs O(K).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..schemes.base import Scheme
from .flash import flash_available, flash_forward
from .reference import dense_attention, visible

MAX_BLOCK_ELEMS = 1 << 22  # ~16 MB of float32 logits per (batch, head) block


def blockwise_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor,
                     causal: bool, scale: float, block: int | None = None) -> Tensor:
    lq, lk = q.shape[2], k.shape[2]
    block = block or max(16, min(512, MAX_BLOCK_ELEMS // max(1, lk * q.shape[0] * q.shape[1])))
    sorted_keys = lk < 2 or bool((k_pos[1:] > k_pos[:-1]).all())
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                         or any(p.requires_grad for p in scheme.parameters()))
    # one output buffer, written block by block: a list of per-block outputs would interleave small
    # long-lived allocations with the large per-block temporaries and fragment the CPU heap (peak
    # RSS then grows like N² although every block is freed)
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    fused = flash_available(q) and lk > 0 and scheme.family == "additive"
    for s in range(0, lq, block):
        qp = q_pos[s:s + block]
        hi = lk
        if causal and sorted_keys:  # keys after the block's last query are masked for every row
            hi = int(torch.searchsorted(k_pos, qp.max(), right=True))
        kp = k_pos[:hi]

        def run(qb: Tensor, kb: Tensor, vb: Tensor, qp: Tensor = qp, kp: Tensor = kp) -> Tensor:
            return dense_attention(qb, kb, vb, scheme.bias(qp, kp), visible(qp, kp, causal), scale)

        if not train and fused and hi > 0 and (not causal or int(qp.min()) >= int(kp.min())):  # every row sees a key
            mask = scheme.bias(qp, kp)
            vis = visible(qp, kp, causal)
            if vis is not None:
                mask = mask.masked_fill_(~vis, float("-inf"))
            o, _ = flash_forward(q[:, :, s:s + block].float(), k[:, :, :hi].float(), v[:, :, :hi].float(), scale,
                                 False, mask.unsqueeze(0))
            out[:, :, s:s + block] = o
            continue

        args = (q[:, :, s:s + block], k[:, :, :hi], v[:, :, :hi])
        out[:, :, s:s + block] = checkpoint(run, *args, use_reentrant=False) if train else run(*args)
    return out
