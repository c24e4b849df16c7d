#!/usr/bin/env python3
"""PyTorch integration: the seed's modules and a Hugging Face model.

1. ``EchoAttention`` as on the seed's page, on q/k/v from the synthetic layer
   (trained-model-like attention, see _workload.py): a request, then a
   near-duplicate one; output error measured against PyTorch SDPA.
2. ``EchoMultiHeadAttention`` (with projections): echo vs its own SDPA path.
3. If transformers is installed: a tiny Llama built from a config (random
   weights, no download) with ``attn_implementation="echo"``; logits compared
   with stock SDPA on a miss and on a hit, and greedy generation.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from _workload import SyntheticLayer, near_duplicate, request
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


if __name__ == "__main__":
    seed_modules()
    hugging_face()
