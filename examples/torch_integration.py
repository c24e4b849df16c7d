#!/usr/bin/env python3
"""PyTorch integration: the seed's modules and a Hugging Face model.

1. ``EchoAttention`` as on the seed's page, on q/k/v from the synthetic layer
   (trained-model-like attention, see _workload.py): a request, then a
   near-duplicate one; output error measured against PyTorch SDPA.
2. ``EchoMultiHeadAttention`` (with projections): echo vs its own SDPA path.
3. If transformers is installed: a tiny Llama built from a config (random
   weights, no download) with ``attn_implementation="echo"``; logits compared
   with stock SDPA on a miss and on a hit, and greedy generation.
4. If models/echo-llama-6m is there too: the project's small TRAINED model
   through ``attn_implementation="echo"`` end to end: a held-out document,
   then a near-duplicate (an identifier renamed): logits error and next-token
   agreement against stock SDPA, and forward time (the whole model, not only
   attention).
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from _workload import SyntheticLayer, machine_note, near_duplicate, request
from attention_echo.torch import EchoAttention, EchoMultiHeadAttention

torch.manual_seed(0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def sdpa_hidden(q, k, v, heads):
    """Reference for EchoAttention: (B, T, hidden) -> heads -> SDPA (causal) -> (B, T, hidden)."""
    B, T, hidden = q.shape
    split = lambda x: x.view(B, T, heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True).transpose(1, 2).reshape(B, T, hidden)


def seed_modules():
    print("== EchoAttention (hidden 512 = 8 heads x 64), prefix 1792 of 2048 tokens ==")
    layer = SyntheticLayer(heads=8, kv_heads=8, head_dim=64)
    attention = EchoAttention(hidden_dim=512, num_heads=8, cache_capacity=1000)
    ids = request(1, 2048)
    for name, ids in (("request", ids), ("near-duplicate", near_duplicate(ids, 0.03, seed=2))):
        q, k, v, emb = layer(ids)
        # (H, T, D) -> (1, T, H*D): the layout a projection produces.
        q, k, v = (torch.from_numpy(x).transpose(0, 1).reshape(1, 2048, 512) for x in (q, k, v))
        emb = torch.from_numpy(emb[None, :1792])
        with torch.no_grad():
            (out, meta), ms = timed(lambda: attention(query=q, key=k, value=v, prefix_length=1792,
                                                      prefix_embeddings=emb))
            ref, ref_ms = timed(lambda: sdpa_hidden(q, k, v, 8))
        print(f"  {name:15} hit={meta['echo_hit']!s:5} tier={meta['tier']:6} kept={meta['kept_fraction']:.2f} "
              f"{ms:6.1f} ms (SDPA {ref_ms:6.1f} ms)  error vs SDPA {rel(out, ref):.2e}")
    print(f"  stats: {attention.cache.stats['hits']} hits, {attention.cache.stats['misses']} misses\n")

    print("== EchoMultiHeadAttention (hidden 256, 4 heads), batch of 2, prefix 384 of 512 ==")
    mha = EchoMultiHeadAttention(hidden_dim=256, num_heads=4, cache_capacity=100).eval()
    x = torch.randn(2, 512, 256)
    with torch.no_grad():
        ref, _ = mha(x, prefix_length=384, use_echo=False)
        for call in ("first", "repeat"):
            (out, meta), ms = timed(lambda: mha(x, prefix_length=384))
            print(f"  {call:7} compute_mode={meta['compute_mode']:5} {ms:6.1f} ms  error vs SDPA path {rel(out, ref):.2e}")
    print(f"  get_stats(): { {k: v for k, v in mha.get_stats().items() if k in ('hits', 'misses', 'hit_rate', 'num_heads')} }\n")


def hugging_face():
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("== Hugging Face: transformers not installed, skipped ==")
        return
    import attention_echo.hf as echo_hf

    print("== Hugging Face: tiny Llama (2 layers, 4 heads, 2 kv heads), attn_implementation='echo' ==")
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 512))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        echo_hf.enable(model)  # fresh per-layer caches, attn_implementation="echo"
        with echo_hf.echo_context(prefix_length=448, prefix_tokens=ids[0, :448]):
            for call in ("miss", "hit"):
                logits, ms = timed(lambda: model(ids).logits)
                tiers = {layer: m["tier"] for layer, m in echo_hf.last_meta(model).items()}
                print(f"  {call:5} tiers per layer {tiers}  max |logits - sdpa| {(logits - ref).abs().max().item():.2e}  {ms:.1f} ms")
        out = model.generate(ids[:, :32], max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
        want = model.generate(ids[:, :32], max_new_tokens=8, do_sample=False)
    print(f"  greedy generation identical to SDPA: {torch.equal(out, want)}")
    s = echo_hf.stats(model)
    print(f"  stats over layers: hits {s['hits']} (exact {s['hits_exact']}), misses {s['misses']}")


def trained_model(T=1024, P=896):
    import os

    try:
        import _llama2c
        import transformers  # noqa: F401
    except ImportError:
        return
    if not os.path.exists(_llama2c.DEFAULT_MODEL):
        print("\n== trained model: models/echo-llama-6m not found, skipped ==")
        return
    import attention_echo.hf as echo_hf

    model = _llama2c.load_llama2c()
    docs = _llama2c.heldout_documents(min_bytes=4 * T)
    a = torch.tensor([_llama2c.encode(docs[0][1])[:T]])
    b = torch.tensor([_llama2c.encode(_llama2c.rename_identifier(docs[0][1][:P]) + docs[1][1])[:T]])
    print(f"\n== trained echo-llama-6m (8 layers, dim 256), {docs[0][0]}: T={T}, prefix {P}, "
          f"near-duplicate differs in {int((a[0, :P] != b[0, :P]).sum())} prefix tokens ==")
    def median_ms(fn, n=3):
        times = sorted(timed(fn)[1] for _ in range(n))
        return times[n // 2]

    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        model(a)  # warm-up
        ref = model(b).logits
        sdpa_ms = median_ms(lambda: model(b))
        echo_hf.enable(model)
        with echo_hf.echo_context(prefix_length=P):
            # every call a miss: C++ exact attention (+ storing the entry)
            miss_ms = median_ms(lambda: (echo_hf.clear(model), model(b)))
            echo_hf.clear(model)
            model(a)  # fills the per-layer caches with A
            logits = model(b).logits  # B served from A's entries
            metas = echo_hf.last_meta(model)
            hit_ms = median_ms(lambda: model(b))  # (B's own entries may serve these repeats)
            echo_hf.clear(model)
            with echo_hf.echo_context(prefix_tokens=b[0, :P]):
                model(b)
                exact_ms = median_ms(lambda: model(b))
    tiers = [m["tier"] + ("(rej)" if m["rejected"] else "") for _, m in sorted(metas.items())]
    kept = [round(m["kept_fraction"], 2) for _, m in sorted(metas.items())]
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree_suffix = (logits[0, P:].argmax(-1) == ref[0, P:].argmax(-1)).float().mean().item()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[0, :-1], b[0, 1:]).item()
    print(f"  tiers per layer {tiers}")
    print(f"  kept fraction   {kept}")
    print(f"  next-token agreement with SDPA: {agree:.4f} (suffix rows {agree_suffix:.4f}); "
          f"max |logits diff| {(logits - ref).abs().max().item():.3f}; "
          f"loss {nll(logits):.4f} vs {nll(ref):.4f} nats/token")
    print(f"  forward of the whole model, median ms: stock SDPA {sdpa_ms:.0f}, "
          f"echo miss (C++ exact attention) {miss_ms:.0f}, echo hit {hit_ms:.0f}, exact tier (same ids) {exact_ms:.0f}")


if __name__ == "__main__":
    print(machine_note() + "\n")
    seed_modules()
    hugging_face()
    trained_model()
