#!/usr/bin/env python3
"""Benchmark: speed AND measured output error of every tier, next to plain
attention (NumPy and PyTorch SDPA), all measured in this process.

Workload: one synthetic layer with trained-model-like attention (sink + local
band + content, see _workload.py), 8 query heads / 4 kv heads, head_dim 64.
Request A fills the cache; request B is a near-duplicate of A (3% of the
prefix tokens changed) and is what every echo tier serves. Errors are relative
L2 against float64 attention of B (all rows, and the prefix rows alone);
times are the median of --repeat runs. Attention only: an engine's end-to-end
gain is smaller (docs/architecture.md, "What reuse can save").

Second part, when models/echo-llama-6m and transformers are present: the same
comparison per layer on the attention inputs of the project's small TRAINED
model (8 layers, 4 heads / 2 kv heads, head_dim 64) for a held-out document A
and a near-duplicate B (A's most frequent identifier renamed, different
continuation): kept fraction, speed-up over C++ exact attention of the same
layer, guard verdict and measured error.

    python examples/benchmark.py [--tokens 2048] [--prefix 0.9] [--repeat 3] [--no-model]
"""

import argparse
import statistics
import time

import numpy as np

from _workload import (SyntheticLayer, machine_note, near_duplicate, numpy_attention, reference_attention,
                       rel_error, request)
import attention_echo
from attention_echo import AttentionEchoCache, EchoConfig, attention

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is optional
    torch = None


def median_ms(fn, repeat, setup=None, budget_s=2.0):
    """Median wall time of ``fn`` over up to ``repeat`` runs (fewer if they
    exceed ``budget_s`` together); ``setup`` runs untimed before each."""
    times = []
    while len(times) < repeat and sum(times) < budget_s * 1e3:
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def trained_model(T, P, repeat):
    """Per-layer tiers on the attention inputs of the trained echo-llama-6m."""
    import os

    try:
        import _llama2c
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"\n(trained-model part skipped: {err})")
        return
    if not os.path.exists(_llama2c.DEFAULT_MODEL):
        print("\n(trained-model part skipped: models/echo-llama-6m not found)")
        return
    model = _llama2c.load_llama2c()
    docs = _llama2c.heldout_documents(min_bytes=4 * T)
    text_a = docs[0][1]
    text_b = _llama2c.rename_identifier(text_a[:P]) + docs[1][1]
    ids_a = torch.tensor([_llama2c.encode(text_a)[:T]])
    ids_b = torch.tensor([_llama2c.encode(text_b)[:T]])
    changed = int((ids_a[0, :P] != ids_b[0, :P]).sum())
    layers_a = _llama2c.capture_qkv(model, ids_a)
    layers_b = _llama2c.capture_qkv(model, ids_b)
    print(f"\ntrained model echo-llama-6m: {docs[0][0]}, T={T}, prefix={P}, B differs from A in {changed} "
          f"prefix tokens; per layer, median of {repeat}; error: relative L2 vs C++ exact")
    print(f"{'layer':>5} {'exact ms':>9} {'tier':>7} {'kept':>5} {'hit ms':>7} {'speed-up':>8} "
          f"{'est.err':>8} {'err all':>9} {'err prefix':>10} {'exact-tier ms':>13}")
    for layer, ((qa, ka, va), (qb, kb, vb)) in enumerate(zip(layers_a, layers_b)):
        emb_a = va[:, :P].mean(axis=1).reshape(1, -1)  # as attention_echo.hf does
        emb_b = vb[:, :P].mean(axis=1).reshape(1, -1)
        ref = attention(qb, kb, vb)
        exact_ms = median_ms(lambda: attention(qb, kb, vb), repeat)
        cache = AttentionEchoCache()
        state = {"rejected": True}

        def fill():
            if state["rejected"]:
                cache.clear()
                cache.attention_with_echo(qa, ka, va, P, emb_a)

        def hit():
            out, state["meta"] = cache.attention_with_echo(qb, kb, vb, P, emb_b)
            state["rejected"] = state["meta"]["rejected"]
            return out

        fill()
        out = hit()
        meta = state["meta"]
        hit_ms = median_ms(hit, repeat, fill)
        tok = ids_b[0, :P].numpy()
        exact_cache = AttentionEchoCache(EchoConfig(mode="exact"))
        exact_cache.attention_with_echo(qb, kb, vb, P, emb_b, prefix_tokens=tok)
        tier_ms = median_ms(lambda: exact_cache.attention_with_echo(qb, kb, vb, P, emb_b, prefix_tokens=tok), repeat)
        tier = meta["tier"] + ("(rej)" if meta["rejected"] else "")
        print(f"{layer:5d} {exact_ms:9.2f} {tier:>7} {meta['kept_fraction']:5.2f} {hit_ms:7.2f} "
              f"{exact_ms / hit_ms:7.2f}x {meta['estimated_error']:8.4f} {rel_error(out, ref):9.2e} "
              f"{rel_error(out[:, :P], ref[:, :P]):10.2e} {tier_ms:13.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefix", type=float, default=0.9, help="prefix share of the tokens")
    ap.add_argument("--repeat", type=int, default=3, help="max timed runs per method")
    ap.add_argument("--no-model", action="store_true", help="skip the trained-model part")
    args = ap.parse_args()
    T = args.tokens
    P = int(T * args.prefix)

    layer = SyntheticLayer(heads=8, kv_heads=4, head_dim=64)
    ids_a = request(1, T)
    ids_b = near_duplicate(ids_a, 0.03, seed=2)
    ids_b[P:] = request(3, T)[P:]  # a different question after the shared prefix
    qa, ka, va, ea = layer(ids_a)
    qb, kb, vb, eb = layer(ids_b)
    ref = reference_attention(qb, kb, vb)

    def errors(out):
        return rel_error(out, ref), rel_error(out[:, :P], ref[:, :P])

    rows = []  # (method, ms, error all, error prefix, note)

    def add(name, fn, note="", setup=None):
        if setup:
            setup()
        out = fn()  # also the warm-up
        ms = median_ms(fn, args.repeat, setup)
        rows.append((name, ms, *errors(out), note))

    add("numpy (float32, T x T)", lambda: numpy_attention(qb, kb, vb))
    if torch is not None:
        # 4-D (batch 1) inputs: PyTorch's CPU flash kernel (3-D ones take the slow math path).
        tq, tk, tv = (torch.from_numpy(x)[None] for x in (qb, kb, vb))
        tk, tv = tk.repeat_interleave(2, 1), tv.repeat_interleave(2, 1)  # GQA: 4 kv heads -> 8

        def sdpa():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)[0].numpy()

        add(f"torch sdpa ({torch.get_num_threads()} threads)", sdpa)
    add(f"C++ exact ({attention_echo.attention_isa()})", lambda: attention(qb, kb, vb))

    # A miss: exact attention plus what the entry stores (tile mass / logits).
    for mode in ("sparse", "dense"):
        counter = iter(range(10**9))
        cache = AttentionEchoCache(EchoConfig(mode=mode))
        add(f"cache miss, mode={mode}",
            lambda: cache.attention_with_echo(qb, kb, vb, P, eb[:P], namespace=f"m{next(counter)}")[0],
            "exact + store entry")

    # Exact tier: identical prefix tokens (and keys) -> rows copied.
    cache = AttentionEchoCache(EchoConfig(mode="exact"))
    cache.attention_with_echo(qb, kb, vb, P, eb[:P], prefix_tokens=ids_b[:P])
    meta = cache.attention_with_echo(qb, kb, vb, P, eb[:P], prefix_tokens=ids_b[:P])[1]
    add("exact tier hit (same ids)",
        lambda: cache.attention_with_echo(qb, kb, vb, P, eb[:P], prefix_tokens=ids_b[:P])[0],
        f"tier={meta['tier']}")

    # Echo tiers: entry from A, served to B; guard on (default) and off.
    for mode, max_error in (("sparse", None), ("dense", None), ("dense", float("inf"))):
        config = EchoConfig(mode=mode) if max_error is None else EchoConfig(mode=mode, max_error=max_error)
        cache = AttentionEchoCache(config)
        state = {}

        def fill(cache=cache, state=state):
            # A rejected hit replaces the entry with B's own: put A's back (untimed).
            if state.get("rejected", True):
                cache.clear()
                cache.attention_with_echo(qa, ka, va, P, ea[:P])

        def hit(cache=cache, state=state):
            out, state["meta"] = cache.attention_with_echo(qb, kb, vb, P, eb[:P])
            state["rejected"] = state["meta"]["rejected"]
            return out

        fill()
        hit()
        meta = state["meta"]
        guard = "guard off" if max_error else f"guard {config.max_error:g}"
        est = "-" if meta["estimated_error"] != meta["estimated_error"] else f"{meta['estimated_error']:.3f}"
        note = (f"tier={meta['tier']} kept={meta['kept_fraction']:.2f} sim={meta['similarity']:.3f} "
                f"est.err={est}" + (" REJECTED->exact" if meta["rejected"] else ""))
        add(f"echo hit, mode={mode} ({guard})", hit, note, setup=fill)

    base = next(ms for name, ms, *_ in rows if name.startswith("C++ exact"))
    print(machine_note())
    print(f"T={T} tokens, prefix={P}, H=8, Hkv=4, D=64, median of {args.repeat}; "
          f"errors: relative L2 vs float64 attention\n")
    print(f"{'method':38} {'ms':>8} {'vs C++ exact':>12} {'err all':>9} {'err prefix':>10}  note")
    for name, ms, err, err_p, note in rows:
        print(f"{name:38} {ms:8.2f} {base / ms:11.2f}x {err:9.2e} {err_p:10.2e}  {note}")
    if not args.no_model:
        trained_model(T, P, args.repeat)


if __name__ == "__main__":
    main()
