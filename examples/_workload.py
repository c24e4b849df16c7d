"""A synthetic attention workload with the structure trained models show.

Random q/k/v give diffuse attention, which no sparse method can exploit and
which real models do not have. This helper builds one layer of a tiny random
"model" whose heads attend the way trained heads do (docs/architecture.md,
"Tiers", sparse): an attention sink on the first token, a local band (RoPE),
and content-driven columns. Requests are token-id sequences; a near-duplicate
request changes a few tokens. All figures the examples print are measured on
this workload, so they say what the code does on such patterns, not what a
given model gets.
"""

from __future__ import annotations

import numpy as np


class SyntheticLayer:
    """One attention layer: token ids -> (q [H,T,D], k [Hkv,T,D], v [Hkv,T,D],
    token embeddings [T,E])."""

    def __init__(self, heads=8, kv_heads=4, head_dim=64, d_model=96, vocab=4096, seed=0,
                 band=12.0, sink=6.0, content=0.7):
        rng = np.random.default_rng(seed)
        self.heads, self.kv_heads, self.head_dim, self.d_model = heads, kv_heads, head_dim, d_model
        self.embedding = rng.standard_normal((vocab, d_model)).astype(np.float32)
        s = content / np.sqrt(d_model)
        self.wq = (rng.standard_normal((heads, d_model, head_dim)) * s).astype(np.float32)
        self.wk = (rng.standard_normal((kv_heads, d_model, head_dim)) * s).astype(np.float32)
        self.wv = (rng.standard_normal((kv_heads, d_model, head_dim)) / np.sqrt(d_model)).astype(np.float32)
        # A constant direction shared by queries and keys: under RoPE its dot
        # product depends on the offset only -> the local band.
        half = head_dim // 2
        self.band = (band * np.ones(half) / np.sqrt(half)).astype(np.float32)
        self.sink = sink
        # RoPE frequencies; the last pair is left unrotated (carries the sink).
        self.theta = 10000.0 ** (-np.arange(half) / half)
        self.theta[-1] = 0.0

    def _rope(self, x, positions):
        half = self.head_dim // 2
        angle = positions[:, None] * self.theta[None, :]
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    def __call__(self, ids):
        ids = np.asarray(ids)
        T = len(ids)
        x = self.embedding[ids]  # [T, E]
        pos = np.arange(T, dtype=np.float64)
        half = self.head_dim // 2
        q = np.einsum("te,hed->htd", x, self.wq)
        k = np.einsum("te,hed->htd", x, self.wk)
        v = np.einsum("te,hed->htd", x, self.wv)
        q[..., :half] += self.band
        k[..., :half] += self.band
        # Sink: every query looks along the unrotated pair, where only token 0 has a large key.
        q[..., half - 1] += self.sink
        q[..., -1] += self.sink
        k[:, 0, half - 1] += self.sink
        k[:, 0, -1] += self.sink
        q = self._rope(q, pos)
        k = self._rope(k, pos)
        return (np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(k, dtype=np.float32),
                np.ascontiguousarray(v, dtype=np.float32), x)


def request(seed, length, vocab=4096):
    """Token ids of a request (token 0 is BOS = 1)."""
    ids = np.random.default_rng(seed).integers(2, vocab, size=length)
    ids[0] = 1
    return ids


def near_duplicate(ids, fraction=0.03, seed=0, vocab=4096, start=1):
    """``ids`` with ``fraction`` of its tokens (after ``start``) replaced."""
    rng = np.random.default_rng(seed)
    out = ids.copy()
    n = max(1, int(fraction * (len(ids) - start)))
    where = rng.choice(np.arange(start, len(ids)), size=n, replace=False)
    out[where] = rng.integers(2, vocab, size=n)
    return out


def rel_error(x, ref):
    """Relative L2 error ||x - ref|| / ||ref||."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def numpy_attention(q, k, v, scale=None):
    """Plain causal attention in NumPy (float32, T x T scores per head)."""
    H, T, D = q.shape
    group = H // k.shape[0]
    scale = np.float32(1.0 / np.sqrt(D) if scale is None else scale)
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    out = np.empty_like(q)
    for h in range(H):
        s = (q[h] @ k[h // group].T) * scale
        s[mask] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        out[h] = s @ v[h // group]
    return out


def reference_attention(q, k, v):
    """float64 causal attention: the ground truth errors are measured against."""
    return numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))


def machine_note():
    """CPU count and load: timings below are only comparable on an idle machine."""
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPUs, load average {load:.1f} (timings are noisy when it exceeds the CPU count)"
