#!/usr/bin/env python3
"""Basic usage (NumPy): one attention layer, four requests, real measurements.

Requests share a 1,536-token system prompt; the cache serves its rows:
  1. first request              -> miss: exact attention, entry stored
  2. near-duplicate prompt      -> block-sparse echo hit (similar embeddings)
  3. identical prompt tokens    -> exact tier (prefix_tokens given)
  4. unrelated prompt           -> miss
Every output is compared with float64 attention computed here, and timed next
to plain C++ attention (``attention_echo.attention``) on the same request.
The layer is synthetic, with trained-model-like attention (see _workload.py).
"""

import time

import numpy as np

from _workload import SyntheticLayer, machine_note, near_duplicate, reference_attention, rel_error, request
from attention_echo import AttentionEchoCache, EchoConfig, attention

PREFIX, USER = 1536, 128


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, (time.perf_counter() - t0) * 1e3


def main():
    layer = SyntheticLayer(heads=8, kv_heads=4, head_dim=64)
    system = request(seed=1, length=PREFIX)
    prompts = {
        "1 first request": np.concatenate([system, request(11, USER)[1:], [5]]),
        "2 near-duplicate": np.concatenate([near_duplicate(system, 0.03, seed=2), request(12, USER)[1:], [5]]),
        "3 same prompt (ids)": np.concatenate([system, request(13, USER)[1:], [5]]),
        "4 unrelated": np.concatenate([request(99, PREFIX), request(14, USER)[1:], [5]]),
    }

    q, k, v, _ = layer(prompts["1 first request"])
    attention(q, k, v)  # warm up (thread pool, page faults) before timing anything

    cache = AttentionEchoCache(EchoConfig(capacity=1000, similarity_threshold=0.85))
    print(machine_note())
    print(f"cache: {cache!r}; prefix {PREFIX} tokens, 8 query heads, 4 kv heads, head_dim 64\n")
    print(f"{'request':22} {'hit':>5} {'tier':>7} {'sim':>6} {'echoed':>7} {'kept':>6} "
          f"{'guard err':>9} {'true err':>9} {'ms':>7} {'plain ms':>9}")
    for name, ids in prompts.items():
        q, k, v, emb = layer(ids)
        tokens = ids[:PREFIX] if name.startswith(("1", "3")) else None
        (out, meta), ms = timed(cache.attention_with_echo, q, k, v, prefix_length=PREFIX,
                                prefix_embeddings=emb[:PREFIX], prefix_tokens=tokens)
        _, plain_ms = timed(attention, q, k, v)
        err = rel_error(out, reference_attention(q, k, v))
        print(f"{name:22} {str(meta['echo_hit']):>5} {meta['tier']:>7} {meta['similarity']:6.3f} "
              f"{meta['tokens_echoed']:7d} {meta['kept_fraction']:6.2f} {meta['estimated_error']:9.2e} "
              f"{err:9.2e} {ms:7.1f} {plain_ms:9.1f}")

    s = cache.stats
    print(f"\nstats: hits {s['hits']} (exact {s['hits_exact']}, sparse {s['hits_sparse']}, "
          f"dense {s['hits_dense']}), misses {s['misses']}, rejected {s['rejected']}, "
          f"hit rate {s['hit_rate']:.2f}, entries {s['cache_size']}, {s['bytes'] / 1024:.0f} KiB")
    key = cache.compute_semantic_key(layer(system)[3])
    print(f"semantic key: shape {key.shape}, norm {np.linalg.norm(key):.4f}")
    print(repr(cache))


if __name__ == "__main__":
    main()
