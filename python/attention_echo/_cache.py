"""AttentionEchoCache: the seed's Python API over the C++ cache.

This layer only converts arguments: NumPy arrays and PyTorch tensors become
float32 CPU arrays whose last dimension is contiguous (contiguous float32
inputs, and any other strides with a unit last stride, pass without a copy),
the output is allocated here and written in place by C++, and converted back
to the input's dtype (and device). Types and ranks are checked here; every
check on shapes and values (NaN/Inf, prefix length, config) happens in C++,
before the cache is touched, and arrives as ValueError naming the argument.
"""

from __future__ import annotations

import errno
import operator
import os
import sys
from dataclasses import fields
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._config import EchoConfig

__all__ = ["AttentionEchoCache", "attention"]

_INT32 = np.iinfo(np.int32)


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # never import torch just to check a type
    return torch.Tensor if torch is not None else None


def _heads_in(x, name: str):
    """``x`` as a float32 CPU array (NumPy or torch) with a unit last stride."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{name} must have shape (T, D) or (H, T, D), got shape {x.shape}")
        if x.dtype != np.float32 or not x.flags.aligned or (x.shape[-1] > 1 and x.strides[-1] != 4):
            x = np.ascontiguousarray(x, dtype=np.float32)
        return x
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (T, D) or (H, T, D), got shape {tuple(x.shape)}")
        return _torch_f32(x)
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _torch_f32(x):
    """A torch tensor as a detached float32 CPU tensor with a unit last stride
    (no copy when it already is one)."""
    import torch

    x = x.detach()
    if x.device.type != "cpu" or x.dtype != torch.float32:
        x = x.to(device="cpu", dtype=torch.float32)
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _matrix_in(x, name: str):
    """``x`` ((rows, cols) or (cols,)) as a C-contiguous float32 CPU matrix."""
    if x is None:
        return None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if x.dim() == 1:
            x = x.reshape(1, -1)
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (P, E) or (E,), got shape {tuple(x.shape)}")
        return x
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (P, E) or (E,), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _tokens_in(x, name: str = "prefix_tokens"):
    """Token ids (sequence, ndarray or tensor) as a contiguous int32 array."""
    if x is None:
        return None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"{name} must be a sequence of integers, got {type(x).__name__}")
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.min() < _INT32.min or a.max() > _INT32.max:
        raise ValueError(f"{name} values must fit in int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def _int(x, name: str) -> int:
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if not _INT32.min <= value <= _INT32.max:
        raise ValueError(f"{name} must fit in int32, got {value}")
    return value


def _scale(x) -> Optional[float]:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number or None, got {type(x).__name__}") from None


def _empty_like(x):
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, dtype=np.float32)
    import torch

    return torch.empty(tuple(x.shape), dtype=torch.float32)


def _out_for(q, out):
    """A new float32 output like ``q``, or the caller's preallocated ``out``
    (a writeable C-contiguous float32 ndarray of q's shape), which spares a
    serving loop a fresh allocation (and its page faults) per call."""
    if out is None:
        return _empty_like(q)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous float32 array")
    if out.shape != tuple(q.shape):
        raise ValueError(f"out must have the query's shape {tuple(q.shape)}, got {out.shape}")
    return out


def _restore(out, like):
    """``out`` (float32, CPU) in the dtype and device of the caller's ``like``."""
    if isinstance(like, np.ndarray):
        return out if like.dtype == np.float32 else out.astype(like.dtype)
    return out.to(device=like.device, dtype=like.dtype)


def _qkv_in(query, key, value):
    return _heads_in(query, "query"), _heads_in(key, "key"), _heads_in(value, "value")


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
                contiguous float32 passes without a copy). Query head ``h``
                reads kv head ``h // (H // Hkv)``.
            prefix_length: rows ``i < prefix_length`` are the cacheable prefix
                (clipped to T, as the seed did).
            prefix_embeddings: (P, E) or (E,) embeddings of the prefix, for the
                semantic key; required when ``prefix_length > 0``.
            layer_id: transformer layer (part of the key with ``per_layer``).
            scale: logit scale, default ``1/sqrt(D)``.
            causal: causal (default) or bidirectional attention.
            prefix_tokens: token ids of the prefix, enables the exact tier.
            namespace: entries never cross namespaces (e.g. tenants, models).
            out: optional preallocated float32 output (C-contiguous, the
                query's shape), written in place and returned.

        Returns:
            ``(output, meta)``: output shaped and typed like ``query``; meta
            with ``echo_hit``, ``similarity``, ``layer_id``, ``tokens_echoed``,
            ``tokens_computed``, ``compute_mode`` ("full"/"echo"/"exact"),
            ``tier`` ("none"/"exact"/"sparse"/"dense"), ``estimated_error``,
            ``rejected``, ``kept_fraction``.
        """
        q, k, v = _qkv_in(query, key, value)
        out = _out_for(q, out)
        meta = self._run(q, k, v, out, prefix_length, prefix_embeddings, layer_id, scale, causal,
                         prefix_tokens, namespace)
        return _restore(out, query), meta

    def _run(self, q, k, v, out, prefix_length, prefix_embeddings, layer_id, scale, causal,
             prefix_tokens, namespace) -> Dict[str, Any]:
        """Core call on prepared arrays (float32 CPU, unit last stride); writes
        ``out`` in place. Shared by the torch and Hugging Face layers."""
        p = min(_int(prefix_length, "prefix_length"), q.shape[-2])  # the seed clipped to T
        emb = _matrix_in(prefix_embeddings, "prefix_embeddings")
        tokens = _tokens_in(prefix_tokens)
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        return self._impl.attention_with_echo(
            q, k, v, out, p, emb, _int(layer_id, "layer_id"), _scale(scale), bool(causal), tokens, namespace
        )

    def compute_semantic_key(self, embeddings) -> np.ndarray:
        """Unit-norm semantic key (``hash_dim``,) float32 of (P, E) embeddings:
        L2-normalised fixed-seed projection of their mean; the same on every
        run and machine."""
        return self._impl.compute_semantic_key(_matrix_in(embeddings, "embeddings"))

    @property
    def stats(self) -> Dict[str, Any]:
        """Consistent snapshot: the seed's keys (hits, misses, total_lookups,
        hit_rate, cache_size, capacity, ops_saved) and ours (hits per tier,
        rejected, evictions, bytes, max_bytes, tokens echoed/computed,
        flops_saved)."""
        return self._impl.stats()

    def clear(self) -> None:
        """Drop every entry and zero the stats."""
        self._impl.clear()

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
    q, k, v = _qkv_in(query, key, value)
    out = _empty_like(q)
    _core.attention(q, k, v, out, _scale(scale), bool(causal), _int(prefix_length, "prefix_length"))
    return _restore(out, query)
