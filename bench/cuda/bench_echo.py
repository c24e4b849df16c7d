"""End-to-end AttentionEchoCache.attention_with_echo on CUDA tensors against
torch SDPA, in one process on the same bf16 tensors and stream.

    python3 bench/cuda/bench_echo.py [--tokens 4096 8192 16384 32768] [--block 64]
        [--model models/echo-llama-6m/model.bin] [--json out.json]

Timings (H = 32, Hkv = 8, D = 128, causal, bf16; prefix = T, so every row is
a prefix row): wall-clock of the whole Python call, from a synchronised GPU to
the output being ready (torch.cuda.synchronize after it), median of repeats:
  sdpa        F.scaled_dot_product_attention (its default backend choice)
  miss        a fresh cache: k fingerprint, exact kernel with tile-mass
              capture, kept-tile selection on the host, the plan's upload,
              the exact rows' copy into device memory
  miss (off)  the same with mode "off": no tile mass, selection or plan
  exact hit   the same call again (same prefix_tokens): fingerprint + row copy
  sparse hit  a near-duplicate (q, k, v + 2% noise, no tokens): the stored
              plan over the new tensors, then the guard's rows on the device
Inputs are not N(0, 1): attention on random q and k is nearly uniform and no
tile can be skipped. q_t = 3 (k_t + k_0) + noise gives each head a sink and a
local band, so the kept share is small (it is reported).

With --model, the bundled llama2.c model's real q, k, v (tools/llama_reference.py
on the host, then bf16 on the GPU, per_layer caches) over held-out text: per
layer the kept share of a miss's tiles and the guard's error when the same
text, and the text with every 50th byte changed, are served sparse.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from attention_echo import AttentionEchoCache, EchoConfig

H, HKV, D = 32, 8, 128


def peaked_qkv(tokens, seed, noise=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(HKV, tokens, D, generator=g, device="cuda")
    v = torch.randn(HKV, tokens, D, generator=g, device="cuda")
    if noise:
        j = torch.Generator(device="cuda").manual_seed(seed + 1000)
        k = k + noise * torch.randn(k.shape, generator=j, device="cuda")
        v = v + noise * torch.randn(v.shape, generator=j, device="cuda")
    kq = k.repeat_interleave(H // HKV, dim=0)
    q = 3.0 * (kq + kq[:, :1]) + 0.3 * torch.randn(H, tokens, D, generator=g, device="cuda")
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def wall_ms(fn, repeats, before=None):
    """Median wall-clock ms of fn() from a synchronised GPU to its end;
    before() (untimed) runs ahead of each repeat."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_tokens(t, repeats, block):
    q, k, v = peaked_qkv(t, 1)
    q2, k2, v2 = peaked_qkv(t, 1, noise=0.02)
    emb = torch.randn(16).repeat(64, 1)  # one semantic key for both: similarity 1
    tokens = np.arange(t, dtype=np.int32)  # as a serving loop keeps them (a list costs ~2 ms to convert at 32k)
    config = dict(capacity=4, max_prefix_length=t, block_size=block, device_max_bytes=16 << 30)
    cache, plain = AttentionEchoCache(EchoConfig(**config)), AttentionEchoCache(EchoConfig(mode="off", **config))
    sdpa = lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)
    miss = lambda: cache.attention_with_echo(q, k, v, t, emb, prefix_tokens=tokens)
    near = lambda: cache.attention_with_echo(q2, k2, v2, t, emb)
    plain_miss = lambda: plain.attention_with_echo(q, k, v, t, emb, prefix_tokens=tokens)
    for _ in range(2):  # warm-up: CUDA setup, allocator, cuDNN plans
        sdpa(), cache.clear(), miss(), miss(), near(), plain.clear(), plain_miss()
    row = {"tokens": t, "sdpa_ms": wall_ms(sdpa, repeats), "miss_ms": wall_ms(miss, repeats, cache.clear),
           "miss_off_ms": wall_ms(plain_miss, repeats, plain.clear)}
    plain.clear()
    cache.clear()
    out, meta_miss = miss()
    row["exact_hit_ms"] = wall_ms(miss, repeats)
    row["sparse_hit_ms"] = wall_ms(near, repeats)
    echo, meta = near()
    ref = sdpa()[0]
    row.update(kept=meta["kept_fraction"], guard_error=meta["estimated_error"], tier=meta["tier"],
               miss_vs_sdpa=rel(out, ref), sparse_vs_exact=rel(echo, F.scaled_dot_product_attention(
                   q2[None], k2[None], v2[None], is_causal=True, enable_gqa=True)[0]))
    return row


def model_kept(path, tokens, block):
    sys.path.append(os.path.join(os.path.dirname(__file__), "..", "..", "tools"))  # after PYTHONPATH
    import llama_reference

    c = llama_reference.load_checkpoint(path, dtype=torch.float32)
    heldout = os.path.join(os.path.dirname(path), "heldout.txt")
    with open(heldout, "rb") as f:
        text = f.read()[: tokens - 1]
    edited = bytes(b ^ 1 if i % 50 == 49 else b for i, b in enumerate(text))
    config = EchoConfig(capacity=64, max_prefix_length=tokens, block_size=block, per_layer=True)
    cache = AttentionEchoCache(config)
    rows = [dict(layer=l) for l in range(c.n_layers)]

    def run(doc, name):
        def on_qkv(layer, q, k, v):
            q, k, v = (x.transpose(0, 1).to("cuda", torch.bfloat16).contiguous() for x in (q, k, v))
            emb = v.float().mean(dim=1).reshape(1, -1)  # the hf integration's prefix embedding
            _, meta = cache.attention_with_echo(q, k, v, q.shape[1], emb, layer_id=layer)
            rows[layer][name] = {key: meta[key] for key in ("tier", "kept_fraction", "estimated_error", "rejected")}

        llama_reference.forward(c, [1] + [b + 3 for b in doc], on_qkv=on_qkv)

    run(text, "miss")
    run(text, "same_text")
    run(edited, "edited_text")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--model")
    parser.add_argument("--model-tokens", type=int, default=4096)
    parser.add_argument("--block", type=int, default=64, choices=(64, 128), help="the cache's block_size")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "block": args.block, "rows": []}
    print(f"{result['gpu']}, torch {result['torch']}; bf16 H={H} Hkv={HKV} D={D} causal, prefix = T, "
          f"block_size {args.block}")
    print("T | SDPA ms | miss ms (x SDPA) | miss off ms | exact hit ms (SDPA / it) | sparse hit ms (SDPA / it) | "
          "kept | guard err | miss vs SDPA | sparse vs exact")
    for t in args.tokens:
        r = bench_tokens(t, 10 if t <= 8192 else 5, args.block)
        result["rows"].append(r)
        print(f"{t} | {r['sdpa_ms']:.3f} | {r['miss_ms']:.2f} ({r['miss_ms'] / r['sdpa_ms']:.2f}x) | {r['miss_off_ms']:.2f} | "
              f"{r['exact_hit_ms']:.3f} ({r['sdpa_ms'] / r['exact_hit_ms']:.1f}x) | "
              f"{r['sparse_hit_ms']:.3f} ({r['sdpa_ms'] / r['sparse_hit_ms']:.2f}x) | {r['kept']:.3f} | "
              f"{r['guard_error']:.4f} | {r['miss_vs_sdpa']:.1e} | {r['sparse_vs_exact']:.1e}", flush=True)
    if args.model:
        result["model"] = model_kept(args.model, args.model_tokens, args.block)
        for r in result["model"]:
            print(r["layer"], {k: v for k, v in r.items() if k != "layer"}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
