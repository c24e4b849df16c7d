"""EchoRequest: what one attention call asks of the cache besides q, k, v.

Every integration builds one per sequence and hands it to the cache: the array
API (``AttentionEchoCache.attention_with_echo``), the torch modules and the
Hugging Face attention function. Its fields are checked and converted once,
when it is built; checks that need q, k, v (prefix length against T, finite
embeddings, ...) happen in C++.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from ._convert import int_in, matrix_in, namespace_in, scale_in, tokens_in

__all__ = ["EchoRequest"]


@dataclass(frozen=True, eq=False)
class EchoRequest:
    """One sequence's request, validated at construction (ValueError or
    TypeError naming the field); the stored fields are the converted values.

    Attributes:
        prefix_length: rows ``i < prefix_length`` are the cacheable prefix
            (an int32; the cache clips it to T, as the seed did).
        prefix_embeddings: embeddings of the prefix, the input of the semantic
            key (the core mean-pools, projects and normalises them, see
            ``AttentionEchoCache.compute_semantic_key``): stored as a (P, E)
            C-contiguous float32 matrix (an (E,) vector becomes one row), or
            None. Required when ``prefix_length > 0``. Each integration
            defines what they are: the caller's for arrays, the seed's
            default in ``attention_echo.torch.default_prefix_embeddings``,
            the layer's values in ``attention_echo.hf``.
        layer_id: transformer layer (part of the key with ``per_layer``).
        scale: logit scale, None for ``1/sqrt(D)``.
        causal: causal (default) or bidirectional attention.
        prefix_tokens: token ids of the prefix as an (P,) int32 array, which
            enables the exact tier; None without.
        namespace: entries never cross namespaces (e.g. tenants, models).
    """

    prefix_length: int = 0
    prefix_embeddings: Any = None
    layer_id: int = 0
    scale: Optional[float] = None
    causal: bool = True
    prefix_tokens: Any = None
    namespace: str = ""

    def __post_init__(self) -> None:
        namespace_in(self.namespace)
        converted = {
            "prefix_length": int_in(self.prefix_length, "prefix_length"),
            "prefix_embeddings": matrix_in(self.prefix_embeddings, "prefix_embeddings"),
            "layer_id": int_in(self.layer_id, "layer_id"),
            "scale": scale_in(self.scale),
            "causal": bool(self.causal),
            "prefix_tokens": tokens_in(self.prefix_tokens),
        }
        for name, value in converted.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @classmethod
    def per_sequence(cls, batch: int, prefix_embeddings=None, prefix_tokens=None, **fields) -> List["EchoRequest"]:
        """One request per sequence of a batch of ``batch``.

        ``prefix_embeddings``: (B, P, E) one set per sequence, or (P, E) / (E,)
        shared by all; ``prefix_tokens``: (B, P) (or a list of B sequences)
        one per sequence, or (P,) shared. ``fields`` (prefix_length,
        layer_id, scale, causal, namespace) are the same for every sequence.
        """
        embeddings = _split(prefix_embeddings, batch, getattr(prefix_embeddings, "ndim", 0) == 3,
                            "prefix_embeddings")
        tokens = _split(prefix_tokens, batch, _is_token_batch(prefix_tokens), "prefix_tokens")
        return [cls(prefix_embeddings=e, prefix_tokens=t, **fields) for e, t in zip(embeddings, tokens)]


def _is_token_batch(tokens) -> bool:
    if isinstance(tokens, (list, tuple)):
        return bool(tokens) and hasattr(tokens[0], "__len__")
    return getattr(tokens, "ndim", None) == 2


def _split(x, batch: int, batched: bool, name: str) -> list:
    """``x`` per sequence: its rows when ``batched``, else ``x`` for each."""
    if not batched:
        return [x] * batch
    if len(x) != batch:
        raise ValueError(f"{name} must have one entry per sequence ({batch}), got {len(x)}")
    return [x[b] for b in range(batch)]
