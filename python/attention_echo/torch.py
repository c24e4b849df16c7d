"""PyTorch attention layers with AttentionEcho support (the seed's two modules).

IMPORTANT: AttentionEcho is an INFERENCE-ONLY optimization. The echo path runs
in C++ and does not propagate gradients; use these layers under
``torch.no_grad()`` / ``torch.inference_mode()``. A ``UserWarning`` is issued
once per module when they are called with gradients enabled.

CPU float32 tensors reach the C++ core without copies (DLPack): each sequence
of a batch is passed as a strided (heads, tokens, head_dim) view of the
(B, T, heads * head_dim) projection, and the output is written in place into
the (B, T, hidden) result. CUDA float16/bfloat16 tensors do the same on their
device, on torch's current stream (a build with AE_CUDA). Other dtypes and
devices are converted to CPU float32 and back.

Differences from the seed, on purpose:

* Attention is causal by default (``causal=True``) on every path, also for
  ``prefix_length == 0`` and batches (the seed silently switched to
  bidirectional attention there). Pass ``causal=False`` for encoders.
* Batches go through the cache sequence by sequence (the seed fell back to
  plain attention for batch > 1).
* ``EchoMultiHeadAttention`` uses one cache for all heads (the core handles
  heads together) instead of one cache per head.
* An explicit ``attn_mask`` / ``attention_mask`` uses PyTorch's
  ``scaled_dot_product_attention`` with that mask (as the seed's standard
  path did), not the cache.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._cache import AttentionEchoCache
from ._config import EchoConfig
from ._convert import cuda_heads, torch_f32
from ._request import EchoRequest

__all__ = ["EchoAttention", "EchoMultiHeadAttention", "echo_attention"]

_GRAD_WARNING = (
    "{name} is inference-only. Gradients will not flow through the echo path. "
    "Use torch.no_grad() for inference."
)


def _make_config(config: Optional[EchoConfig], cache_capacity: Optional[int]) -> EchoConfig:
    if config is None:
        config = EchoConfig()
    elif not isinstance(config, EchoConfig):
        raise TypeError(f"config must be an EchoConfig or None, got {type(config).__name__}")
    if cache_capacity is not None:
        config = replace(config, capacity=cache_capacity)
    return config


def _default_prefix_embeddings(inputs: torch.Tensor, prefix_length: int) -> Optional[torch.Tensor]:
    """The prefix embeddings of the torch modules when the caller passes none.

    The seed's definition: the module's input rows of the prefix,
    ``inputs[:, :prefix_length]`` (B, P, hidden), where the input is
    ``query`` for ``EchoAttention`` and ``hidden_states`` for
    ``EchoMultiHeadAttention``; the core mean-pools them into the semantic
    key. None without a prefix (nothing to key).
    """
    return inputs[:, :prefix_length] if prefix_length > 0 else None


def _merge_meta(metas: List[Dict[str, Any]]) -> Dict[str, Any]:
    if len(metas) == 1:
        return metas[0]
    hits = [m["echo_hit"] for m in metas]
    return {
        "echo_hit": all(hits),
        "tokens_echoed": sum(m["tokens_echoed"] for m in metas),
        "tokens_computed": sum(m["tokens_computed"] for m in metas),
        "compute_mode": "echo" if all(hits) else ("partial_echo" if any(hits) else "full"),
        "per_sequence": metas,
    }


def _echo_batch(
    cache: AttentionEchoCache,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    requests: Sequence[EchoRequest],
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``echo_attention`` with one prepared request per sequence: the path
    every torch and Hugging Face caller takes to the cache."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be (B, H, T, D) tensors, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, heads, tokens, dim = query.shape
    dtype, device = query.dtype, query.device

    # CUDA tensors stay on the device in their dtype; the rest goes through float32 on the host.
    prepare = cuda_heads if query.is_cuda else torch_f32
    q, k, v = prepare(query), prepare(key), prepare(value)
    # The caller's out is written in place when it is what the core writes: q's dtype and device, with
    # the layout the CUDA kernels load (contiguous) or a unit last stride on the host.
    direct = (out is not None and out.dtype == q.dtype and out.device == q.device
              and (out.is_contiguous() if q.is_cuda else out.stride(-1) == 1))
    result = out if direct else torch.empty(batch, tokens, heads, dim, dtype=q.dtype, device=q.device)
    # result[b].transpose(0, 1): the (H, T, D) view of the token-major output.
    metas = [cache._run(q[b], k[b], v[b], result[b].transpose(0, 1), requests[b]) for b in range(batch)]
    if out is not None and not direct:
        out.copy_(result)
        result = out
    elif result.dtype != dtype or result.device != device:
        result = result.to(device=device, dtype=dtype)
    return result, _merge_meta(metas)


def echo_attention(
    cache: AttentionEchoCache,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_length: int,
    prefix_embeddings=None,
    *,
    layer_id: int = 0,
    scale: Optional[float] = None,
    causal: bool = True,
    prefix_tokens=None,
    namespace: str = "",
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Batched echo attention on head-split tensors, through ``cache``.

    ``query`` is (B, H, T, D) and ``key``/``value`` (B, Hkv, T, D), any
    strides with a contiguous last dimension (e.g. the transposed view of a
    (B, T, H*D) projection). ``prefix_embeddings``: (B, P, E), or (P, E)
    shared by all sequences; ``prefix_tokens``: (B, P) or (P,). Returns the
    output as (B, T, H, D) (token-major, the layout an output projection
    wants) in ``query``'s dtype and device, and the metadata (the core's dict
    for B == 1, a summary with ``per_sequence`` otherwise).
    """
    requests = EchoRequest.per_sequence(
        query.shape[0], prefix_embeddings, prefix_tokens, prefix_length=prefix_length, layer_id=layer_id,
        scale=scale, causal=causal, namespace=namespace,
    )
    return _echo_batch(cache, query, key, value, requests, out)


def _sdpa(q, k, v, mask, scale, causal, dropout_p=0.0):
    """PyTorch SDPA on (B, H, T, D) with GQA; returns (B, T, H, D)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None, scale=scale
    )
    return out.transpose(1, 2)


class _EchoBase(nn.Module):
    """What both modules share: config, cache, scale, and the one dispatch
    between the cache and PyTorch SDPA (``_attend``)."""

    def __init__(self, hidden_dim: int, num_heads: int, config: Optional[EchoConfig],
                 cache_capacity: Optional[int], layer_id: int, causal: bool) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.config = _make_config(config, cache_capacity)
        self.layer_id = layer_id
        self.causal = causal
        self.cache = AttentionEchoCache(self.config)
        self.scale = self.head_dim**-0.5
        self._warned_grad = False

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inputs: torch.Tensor,
        prefix_length: int,
        prefix_embeddings,
        prefix_tokens,
        namespace: str,
        mask: Optional[torch.Tensor] = None,
        use_echo: bool = True,
        dropout_p: float = 0.0,
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Attention of (B, H, T, D) ``q`` and (B, Hkv, T, D) ``k``/``v``;
        returns the (B, T, H, D) output and the metadata.

        An explicit ``mask`` or ``use_echo=False`` runs PyTorch SDPA (the
        seed's standard path, ``compute_mode`` "standard"); otherwise the
        cache, one request per sequence, with ``prefix_embeddings`` defaulting
        to ``_default_prefix_embeddings(inputs, prefix_length)``.
        """
        if mask is not None or not use_echo:
            out = _sdpa(q, k, v, mask, self.scale, self.causal, dropout_p)
            return out, {"echo_hit": False, "compute_mode": "standard", "tokens_computed": q.shape[2]}
        self._warn_if_grad(q, k, v)
        if prefix_embeddings is None:
            prefix_embeddings = _default_prefix_embeddings(inputs, prefix_length)
        requests = EchoRequest.per_sequence(
            q.shape[0], prefix_embeddings, prefix_tokens, prefix_length=prefix_length,
            layer_id=self.layer_id, scale=self.scale, causal=self.causal, namespace=namespace,
        )
        return _echo_batch(self.cache, q, k, v, requests)

    def _warn_if_grad(self, *tensors: torch.Tensor) -> None:
        if self._warned_grad or not torch.is_grad_enabled():
            return
        if any(t.requires_grad for t in tensors):
            # stacklevel: the caller of forward (through _attend and nn.Module.__call__).
            warnings.warn(_GRAD_WARNING.format(name=type(self).__name__), UserWarning, stacklevel=4)
            self._warned_grad = True

    def clear_cache(self) -> None:
        self.cache.clear()

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, layer_id={self.layer_id}, causal={self.causal}"


class EchoAttention(_EchoBase):
    """Scaled dot-product attention with AttentionEcho caching (no projections).

    Drop-in for the seed's ``EchoAttention``: ``query``/``key``/``value`` are
    (B, T, hidden_dim) (or (T, hidden_dim)); ``num_heads`` splits the hidden
    dimension into heads (default 1: one head over ``hidden_dim``, the seed's
    behaviour, scale ``hidden_dim ** -0.5``); keys/values with fewer columns
    give grouped-query attention.

    WARNING: inference-only; the echo path breaks gradient flow.

    Example:
        >>> attention = EchoAttention(hidden_dim=768, num_heads=12, cache_capacity=1000)
        >>> with torch.no_grad():
        ...     output, meta = attention(query=q, key=k, value=v, prefix_length=10)
        >>> attention.cache.stats["hits"]
    """

    def __init__(
        self,
        hidden_dim: int = 768,
        config: Optional[EchoConfig] = None,
        layer_id: int = 0,
        num_heads: int = 1,
        cache_capacity: Optional[int] = None,
        causal: bool = True,
    ) -> None:
        if hidden_dim <= 0 or num_heads <= 0 or hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a positive multiple of num_heads ({num_heads})")
        super().__init__(hidden_dim, num_heads, config, cache_capacity, layer_id, causal)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        prefix_length: int = 0,
        prefix_embeddings: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        *,
        prefix_tokens=None,
        namespace: str = "",
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Returns ``(output, metadata)``; output shaped like ``query``.

        ``prefix_embeddings``: (B, P, E) or (P, E); default
        ``query[:, :prefix_length]`` (see ``_default_prefix_embeddings``)."""
        squeeze = query.dim() == 2
        if squeeze:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"query, key and value must be (B, T, hidden) or (T, hidden), got {tuple(query.shape)}"
            )
        if query.shape[-1] != self.hidden_dim:
            raise ValueError(f"query: last dimension {query.shape[-1]} != hidden_dim {self.hidden_dim}")
        if key.shape[-1] % self.head_dim != 0:
            raise ValueError(f"key: last dimension {key.shape[-1]} is not a multiple of head_dim {self.head_dim}")
        batch, tokens, _ = query.shape
        hd = self.head_dim
        q = query.reshape(batch, tokens, -1, hd).transpose(1, 2)
        k = key.reshape(batch, key.shape[1], -1, hd).transpose(1, 2)
        v = value.reshape(batch, value.shape[1], -1, hd).transpose(1, 2)
        out, meta = self._attend(q, k, v, query, prefix_length, prefix_embeddings, prefix_tokens, namespace,
                                 mask=attn_mask)
        out = out.reshape(batch, tokens, self.hidden_dim)
        return (out[0] if squeeze else out), meta


class EchoMultiHeadAttention(_EchoBase):
    """Multi-head self-attention (q/k/v/out projections) with AttentionEcho.

    The seed's module: ``forward(hidden_states, prefix_length, attention_mask,
    use_echo)`` returns ``(output, metadata)``. The attention of every head
    runs in one C++ call per sequence; the projections stay in PyTorch.
    ``prefix_embeddings`` default to ``hidden_states[:, :prefix_length]`` (the
    seed's choice, see ``_default_prefix_embeddings``).

    WARNING: inference-only; the echo path breaks gradient flow.
    """

    def __init__(
        self,
        hidden_dim: int = 768,
        num_heads: int = 12,
        config: Optional[EchoConfig] = None,
        layer_id: int = 0,
        dropout: float = 0.0,
        bias: bool = True,
        cache_capacity: Optional[int] = None,
        causal: bool = True,
    ) -> None:
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(hidden_dim, num_heads, config, cache_capacity, layer_id, causal)
        self.q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def get_stats(self) -> Dict[str, Any]:
        """The seed's summary (hits, misses, total_lookups, hit_rate,
        ops_saved, num_heads) plus the cache's full stats."""
        stats = dict(self.cache.stats)
        stats["num_heads"] = self.num_heads
        return stats

    def forward(
        self,
        hidden_states: torch.Tensor,
        prefix_length: int = 0,
        attention_mask: Optional[torch.Tensor] = None,
        use_echo: bool = True,
        *,
        prefix_embeddings=None,
        prefix_tokens=None,
        namespace: str = "",
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"hidden_states must be (B, T, {self.hidden_dim}), got {tuple(hidden_states.shape)}"
            )
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out, meta = self._attend(
            q, k, v, hidden_states, prefix_length, prefix_embeddings, prefix_tokens, namespace,
            mask=attention_mask, use_echo=use_echo, dropout_p=self.dropout.p if self.training else 0.0,
        )
        return self.out_proj(out.reshape(batch, tokens, self.hidden_dim)), meta
