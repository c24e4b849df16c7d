#!/usr/bin/env python3
"""Simulated multi-user serving: many Python threads share one cache.

Requests (one attention layer each, synthetic trained-model-like attention,
see _workload.py) are a system prompt followed by a user question:
  50%  one of 3 system prompts, unchanged         -> exact tier (token ids match)
  30%  a personalised copy (3% of tokens changed) -> block-sparse echo
  20%  an unrelated prompt                         -> miss
They are served by 4 worker threads twice, with plain C++ attention and with
the shared AttentionEchoCache; the script prints throughput, latency, hits per
tier and the measured output error of every served request against plain
attention. The GIL is released inside the C++ calls, so threads overlap.
"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from _workload import SyntheticLayer, machine_note, near_duplicate, rel_error, request
from attention_echo import AttentionEchoCache, EchoConfig, attention

T, PREFIX, REQUESTS, WORKERS = 2048, 1792, 32, 4


def make_requests(layer):
    rng = np.random.default_rng(7)
    templates = [request(100 + i, PREFIX) for i in range(3)]
    reqs = []
    for n in range(REQUESTS):
        kind = rng.choice(["same", "personalised", "unrelated"], p=[0.5, 0.3, 0.2])
        system = templates[n % 3]
        if kind == "personalised":
            system = near_duplicate(system, 0.03, seed=1000 + n)
        elif kind == "unrelated":
            system = request(2000 + n, PREFIX)
        ids = np.concatenate([system, request(3000 + n, T - PREFIX + 1)[1:]])
        q, k, v, emb = layer(ids)
        reqs.append(dict(kind=kind, ids=ids, q=q, k=k, v=v, emb=emb[:PREFIX]))
    return reqs


def serve(fn, reqs):
    def one(r):
        t0 = time.perf_counter()
        result = fn(r)
        return result, (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(one, reqs))
    return results, time.perf_counter() - t0


def main():
    layer = SyntheticLayer(heads=8, kv_heads=4, head_dim=64)
    reqs = make_requests(layer)
    attention(reqs[0]["q"], reqs[0]["k"], reqs[0]["v"])  # warm-up

    plain, plain_s = serve(lambda r: attention(r["q"], r["k"], r["v"]), reqs)

    cache = AttentionEchoCache(EchoConfig(capacity=256))
    served, echo_s = serve(
        lambda r: cache.attention_with_echo(r["q"], r["k"], r["v"], PREFIX, r["emb"],
                                            prefix_tokens=r["ids"][:PREFIX], namespace="model-a"),
        reqs,
    )

    by_kind = {}
    for r, ((out, meta), _), (ref, _) in zip(reqs, served, plain):
        by_kind.setdefault(r["kind"], []).append((meta["tier"], rel_error(out, ref)))
    print(f"{REQUESTS} requests of {T} tokens (system prompt {PREFIX}), {WORKERS} threads, 1 layer "
          f"(8 heads, 4 kv heads, head_dim 64)\n")
    print(machine_note())
    print(f"{'':14} {'wall s':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7}")
    for name, results, wall in (("plain", plain, plain_s), ("echo cache", served, echo_s)):
        lat = sorted(ms for _, ms in results)
        print(f"{name:14} {wall:7.2f} {len(lat) / wall:7.1f} {statistics.median(lat):7.1f} "
              f"{lat[int(0.95 * (len(lat) - 1))]:7.1f}")
    print(f"\nspeed-up (attention only): {plain_s / echo_s:.2f}x\n")
    print(f"{'request kind':14} {'count':>5}  {'tiers served':32} {'mean err':>9} {'max err':>9}")
    for kind, rows in by_kind.items():
        tiers = {}
        for tier, _ in rows:
            tiers[tier] = tiers.get(tier, 0) + 1
        errs = [e for _, e in rows]
        print(f"{kind:14} {len(rows):5}  {str(tiers):32} {np.mean(errs):9.2e} {max(errs):9.2e}")
    s = cache.stats
    print(f"\ncache: hits {s['hits']} (exact {s['hits_exact']}, sparse {s['hits_sparse']}, dense {s['hits_dense']}), "
          f"misses {s['misses']} (rejected {s['rejected']}), hit rate {s['hit_rate']:.2f}, "
          f"{s['cache_size']} entries, {s['bytes'] / 2**20:.1f} MiB")
    print("errors: relative L2 of each served output against plain attention of the same request")
    print("an unchanged prompt gets the exact tier once an entry with its token ids is cached; before that\n"
          "(first arrivals, or a personalised copy cached first) it is a miss or a sparse echo hit")


if __name__ == "__main__":
    main()
