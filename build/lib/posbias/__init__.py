"""posbias: relative positional biases for attention — exact, fast, visible.

The package namespace is the catalogue: the scheme registry, the builders, the public helpers and
the attention function. Importing posbias imports neither matplotlib, transformers nor
FlexAttention.
"""

from .attention import attention, attention_reference
from .schemes import (
    SCHEMES,
    Scheme,
    ToeplitzScheme,
    alibi_slopes,
    build,
    ntk_lambda,
    rope_frequencies,
    scheme_options,
    t5_bucket,
    yarn_frequencies,
)

from ._version import __version__

__all__ = [
    "SCHEMES", "Scheme", "ToeplitzScheme", "build", "scheme_options", "t5_bucket", "alibi_slopes",
    "rope_frequencies", "ntk_lambda", "yarn_frequencies", "attention", "attention_reference",
    "__version__",
]
