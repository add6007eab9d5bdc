"""FlexAttention for users' own models: a ``score_mod`` for any Toeplitz scheme, and a causal block mask.

::

    from torch.nn.attention.flex_attention import flex_attention
    from posbias.integrations.flex import causal_block_mask
    score_mod = scheme.score_mod(q_len, k_len)             # any ToeplitzScheme: a [heads, q_len + k_len − 1] table
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(q_len, k_len),
                         scale=scheme.default_scale())      # T5: unscaled (scale 1)

or through posbias: ``posbias.attention(..., backend="flex")``. The table code lives with the
schemes (:mod:`posbias.schemes.score_mod`), the compiled kernel with the kernels
(:mod:`posbias.kernels.flex`); this module gathers what a FlexAttention user needs.
"""

from __future__ import annotations

from ..kernels.flex import causal_block_mask, flex_available, flex_kernel
from ..schemes.score_mod import ScoreMod, offset_table, score_mod

__all__ = ["offset_table", "score_mod", "causal_block_mask", "flex_available", "flex_kernel", "ScoreMod"]
