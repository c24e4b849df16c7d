"""The seed package's algorithm (AttentionEcho 0.1.0), reproduced in NumPy
from its project page (docs/architecture.md, "Tiers", dense), for measurement only: it is
the baseline tools/run_benchmarks.py compares our miss and hit paths with.
Not part of the library.

Per its description: the semantic key is normalize(mean_pool(embeddings))
truncated or tiled to hash_dim; lookup is a linear cosine scan; a miss
computes softmax(Q K^T) and stores the prefix pattern, the prefix queries and
a D x p x p Jacobian of the probabilities with respect to the queries; a hit
adjusts the cached probabilities by alpha * delta_q @ Jacobian, clips,
renormalises and multiplies by the new V. Rows past the prefix are computed
exactly. One head, (T, D) inputs.
"""

from __future__ import annotations

import numpy as np


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _causal_attention_rows(q, k, v, rows, scale):
    logits = scale * q[rows] @ k.T
    mask = np.arange(k.shape[0])[None, :] > rows[:, None]
    logits[mask] = -np.inf
    return _softmax(logits) @ v


class SeedEchoCache:
    def __init__(self, threshold=0.85, hash_dim=128, alpha=0.1):
        self.threshold, self.hash_dim, self.alpha = threshold, hash_dim, alpha
        self.entries = []  # (key, pattern [p,p], queries [p,D], jacobian [D,p,p])

    def clear(self):
        self.entries.clear()

    def entry_bytes(self):
        return sum(p.nbytes + q.nbytes + j.nbytes for _, p, q, j in self.entries)

    def _key(self, emb):
        pooled = emb.mean(axis=0)
        reps = -(-self.hash_dim // pooled.size)
        key = np.tile(pooled, reps)[: self.hash_dim]
        return key / (np.linalg.norm(key) + 1e-12)

    def attention_with_echo(self, q, k, v, prefix, emb):
        scale = 1.0 / np.sqrt(q.shape[-1])
        key = self._key(emb)
        best, best_sim = None, -1.0
        for entry in self.entries:
            sim = float(entry[0] @ key)
            if sim > best_sim:
                best, best_sim = entry, sim
        out = np.empty_like(q)
        suffix = np.arange(prefix, q.shape[0])
        out[prefix:] = _causal_attention_rows(q, k, v, suffix, scale)
        if best is not None and best_sim > self.threshold:
            _, pattern, cached_q, jacobian = best
            delta_q = q[:prefix] - cached_q                                # [p, D]
            adjusted = pattern + self.alpha * np.einsum("id,dij->ij", delta_q, jacobian)
            adjusted = np.clip(adjusted, 0.0, None)
            adjusted /= adjusted.sum(axis=-1, keepdims=True) + 1e-12
            out[:prefix] = adjusted @ v[:prefix]
            return out, {"echo_hit": True, "similarity": best_sim, "tokens_echoed": prefix}
        logits = scale * q[:prefix] @ k[:prefix].T
        logits[np.triu_indices(prefix, 1)] = -np.inf
        pattern = _softmax(logits)
        out[:prefix] = pattern @ v[:prefix]
        # dP_ij / dq_i = scale * P_ij * (k_j - sum_l P_il k_l): stored for every d.
        kbar = pattern @ k[:prefix]                                        # [p, D]
        jacobian = scale * pattern[None] * (k[:prefix].T[:, None, :] - kbar.T[:, :, None])
        self.entries.append((key, pattern, q[:prefix].copy(), jacobian.astype(np.float32)))
        return out, {"echo_hit": False, "tokens_computed": q.shape[0]}
