"""AttentionEchoCache: the seed's Python API over the C++ cache.

This layer only converts arguments (``_convert``: arrays and tensors to
float32 CPU views without copies where possible, CUDA tensors left on their
device in their dtype; ``EchoRequest``: the other arguments), allocates the
output, which C++ writes in place, and converts it back to the input's dtype
(and device). Types and ranks are checked in
Python; every check on shapes and values (NaN/Inf, prefix length, config)
happens in C++, before the cache is touched, and arrives as ValueError naming
the argument.
"""

from __future__ import annotations

import errno
import os
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._config import EchoConfig
from ._convert import empty_like, int_in, matrix_in, namespace_in, qkv_in, restore, scale_in, stream_of
from ._request import EchoRequest

__all__ = ["AttentionEchoCache", "attention"]


def _out_for(q, out):
    """A new float32 output like ``q``, or the caller's preallocated ``out``
    (a writeable C-contiguous float32 ndarray of q's shape), which spares a
    serving loop a fresh allocation (and its page faults) per call."""
    if out is None:
        return empty_like(q)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous float32 array")
    if out.shape != tuple(q.shape):
        raise ValueError(f"out must have the query's shape {tuple(q.shape)}, got {out.shape}")
    return out


class AttentionEchoCache:
    """Attention with cross-request reuse of the prefix block (C++ core).

    ``attention_with_echo`` computes causal (or bidirectional) attention for
    every row; rows ``i < prefix_length`` depend on the prefix alone and are
    what the cache reuses, best tier first: exact (same ``prefix_tokens``),
    block-sparse or dense echo (similar ``prefix_embeddings``), each echo hit
    checked by the verification guard. Thread-safe; the GIL is released while
    C++ works.

    Example:
        >>> cache = AttentionEchoCache(EchoConfig(capacity=100, similarity_threshold=0.85))
        >>> out1, meta1 = cache.attention_with_echo(q1, k1, v1, 10, emb1)
        >>> meta1["echo_hit"]
        False
    """

    def __init__(self, config: Optional[EchoConfig] = None) -> None:
        if config is None:
            config = EchoConfig()
        elif not isinstance(config, EchoConfig):
            raise TypeError(f"config must be an EchoConfig or None, got {type(config).__name__}")
        self._impl = _core.AttentionEchoCache(config._to_core())

    @property
    def config(self) -> EchoConfig:
        """A copy of the configuration in force (changing it has no effect)."""
        core = self._impl.config()
        return EchoConfig(**{f.name: getattr(core, f.name) for f in fields(EchoConfig)})

    def attention_with_echo(
        self,
        query,
        key,
        value,
        prefix_length: int = 0,
        prefix_embeddings=None,
        layer_id: int = 0,
        scale: Optional[float] = None,
        causal: bool = True,
        prefix_tokens=None,
        namespace: str = "",
        out=None,
    ) -> Tuple[Any, Dict[str, Any]]:
        """Attention over ``query`` (T, D) or (H, T, D) and ``key``/``value``
        (T, D) or (Hkv, T, D), reusing the prefix rows when the cache can.

        Args:
            query, key, value: NumPy arrays or torch tensors (any float dtype;
                contiguous float32 passes without a copy). CUDA tensors
                (float16 or bfloat16, head dim 64 or 128, a build with
                AE_CUDA) stay on their device: the call runs on torch's
                current stream and returns a CUDA tensor, with the entry's
                payloads in device memory (``device_max_bytes``). Query head
                ``h`` reads kv head ``h // (H // Hkv)``.
            prefix_length: rows ``i < prefix_length`` are the cacheable prefix
                (clipped to T, as the seed did).
            prefix_embeddings: (P, E) or (E,) embeddings of the prefix, for the
                semantic key; required when ``prefix_length > 0``. With
                arrays the caller defines them, typically the token
                embeddings of the prefix (as in examples/basic_usage.py).
            layer_id: transformer layer (part of the key with ``per_layer``).
            scale: logit scale, default ``1/sqrt(D)``.
            causal: causal (default) or bidirectional attention.
            prefix_tokens: token ids of the prefix, enables the exact tier.
            namespace: entries never cross namespaces (e.g. tenants, models).
            out: optional preallocated float32 NumPy output (C-contiguous,
                the query's shape), written in place and returned.

        Returns:
            ``(output, meta)``: output shaped and typed like ``query``; meta
            with ``echo_hit``, ``similarity``, ``layer_id``, ``tokens_echoed``,
            ``tokens_computed``, ``compute_mode`` ("full"/"echo"/"exact"),
            ``tier`` ("none"/"exact"/"sparse"/"dense"), ``estimated_error``,
            ``rejected``, ``kept_fraction``.
        """
        q, k, v = qkv_in(query, key, value, device=True)
        out = _out_for(q, out)
        request = EchoRequest(prefix_length, prefix_embeddings, layer_id, scale, causal, prefix_tokens, namespace)
        meta = self._run(q, k, v, out, request)
        return restore(out, query), meta

    def _run(self, q, k, v, out, request: EchoRequest) -> Dict[str, Any]:
        """Core call on prepared arrays (float32 CPU, or CUDA tensors as
        ``cuda_heads`` makes them; unit last stride); writes ``out`` in place.
        Shared by the torch and Hugging Face layers."""
        r = request
        p = min(r.prefix_length, q.shape[-2])  # the seed clipped to T
        return self._impl.attention_with_echo(
            q, k, v, out, p, r.prefix_embeddings, r.layer_id, r.scale, r.causal, r.prefix_tokens, r.namespace,
            stream_of(q),
        )

    def compute_semantic_key(self, embeddings) -> np.ndarray:
        """Unit-norm semantic key (``hash_dim``,) float32 of (P, E) embeddings:
        L2-normalised fixed-seed projection of their mean; the same on every
        run and machine."""
        return self._impl.compute_semantic_key(matrix_in(embeddings, "embeddings"))

    @property
    def stats(self) -> Dict[str, Any]:
        """Consistent snapshot: the seed's keys (hits, misses, total_lookups,
        hit_rate, cache_size, capacity, ops_saved) and ours (hits per tier,
        rejected, evictions, bytes, max_bytes, tokens echoed/computed,
        flops_saved, snapshot_dropped, oversize_skipped: misses whose entry
        alone exceeds max_bytes, served but not stored)."""
        return self._impl.stats()

    @property
    def l2_stats(self) -> Dict[str, Any]:
        """The shared L2 store's counters (``EchoConfig.store_url``; zeros
        without one): lookups, hits, misses, hit_rate, rejected (corrupt or
        mismatched values), timeouts, errors, unavailable (skipped while
        backing off), reconnects, writes, lookup_seconds, max_lookup_seconds."""
        return self._impl.l2_stats()

    def clear(self, namespace: Optional[str] = None) -> None:
        """Drop every entry and zero the stats; with a namespace, drop only
        that tenant's entries and counters (``stats`` loses exactly what
        ``namespace_stats(namespace)`` held)."""
        if namespace is None:
            self._impl.clear()
        else:
            self._impl.clear_namespace(namespace_in(namespace))

    def namespace_stats(self, namespace: str) -> Dict[str, Any]:
        """``stats`` of one namespace: the calls made in it, evictions of its
        entries, its entries and bytes. ``stats`` is their sum over
        ``namespaces()``; a namespace never seen has zeros."""
        return self._impl.namespace_stats(namespace_in(namespace))

    def namespaces(self) -> List[str]:
        """Namespaces with entries or counters, sorted."""
        return self._impl.namespaces()

    def save(self, path) -> None:
        """Write a versioned, checksummed snapshot (temp file + rename);
        RuntimeError if it cannot be written."""
        self._impl.save(os.fspath(path))

    def load(self, path) -> None:
        """Replace the entries with a snapshot's. A missing file raises
        FileNotFoundError, a corrupt one RuntimeError; the cache is then unchanged."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "no such snapshot file", path)
        self._impl.load(path)

    def __len__(self) -> int:
        return self._impl.size()

    def __repr__(self) -> str:
        s = self._impl.stats()
        return f"AttentionEchoCache(size={s['cache_size']}/{s['capacity']}, hit_rate={s['hit_rate']:.2%})"


def attention(query, key, value, scale: Optional[float] = None, causal: bool = True, prefix_length: int = 0):
    """Plain exact attention through the C++ kernel (no cache): the baseline.

    Same shapes and dtype handling as ``AttentionEchoCache.attention_with_echo``.
    With ``causal=False``, ``prefix_length`` makes rows ``i < prefix_length``
    a bidirectional block of their own (0: plain bidirectional attention).
    """
    q, k, v = qkv_in(query, key, value)
    out = empty_like(q)
    _core.attention(q, k, v, out, scale_in(scale), bool(causal), int_in(prefix_length, "prefix_length"))
    return restore(out, query)
