"""Small vector helpers the seed exported (``cosine_similarity``, ``normalize``,
``mean_pool``, ``softmax``). They are NumPy one-liners: not on any hot path."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_similarity", "normalize", "mean_pool", "softmax"]


def cosine_similarity(a, b) -> float:
    """Cosine similarity of two vectors (flattened); 0.0 if either is zero."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"b: shape {b.shape} != a's {a.shape}")
    na = np.linalg.norm(a)
    nb = np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def normalize(x, axis: int = -1, eps: float = 1e-12):
    """L2-normalise along ``axis``; zero vectors stay zero. Keeps float dtypes."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def mean_pool(x, axis: int = 0):
    """Mean over ``axis`` (the token axis by default)."""
    return np.asarray(x).mean(axis=axis)


def softmax(x, axis: int = -1):
    """Numerically stable softmax along ``axis``."""
    x = np.asarray(x, dtype=np.float64) if np.asarray(x).dtype.kind != "f" else np.asarray(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)
