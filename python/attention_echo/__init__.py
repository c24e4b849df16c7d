"""AttentionEcho: reuse attention computation across LLM requests.

The seed package's API (AttentionEcho 0.1.0) over a C++20 core::

    from attention_echo import AttentionEchoCache, EchoConfig, cosine_similarity, normalize
    cache = AttentionEchoCache(EchoConfig(capacity=1000, similarity_threshold=0.85))
    out, meta = cache.attention_with_echo(query=q, key=k, value=v,
                                          prefix_length=10, prefix_embeddings=emb)

``attention_echo.torch`` has PyTorch modules, ``attention_echo.hf`` the
Hugging Face transformers attention implementation "echo".
"""

from . import _core
from ._cache import AttentionEchoCache, attention
from ._config import EchoConfig
from .utils import cosine_similarity, mean_pool, normalize

__version__ = _core.__version__

#: SIMD code path the C++ kernels use on this CPU ("avx512", "avx2", "scalar").
def attention_isa() -> str:
    return _core.attention_isa()


__all__ = [
    "AttentionEchoCache",
    "EchoConfig",
    "attention",
    "attention_isa",
    "cosine_similarity",
    "mean_pool",
    "normalize",
    "__version__",
]
