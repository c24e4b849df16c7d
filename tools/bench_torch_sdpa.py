#!/usr/bin/env python3
"""Time PyTorch's CPU scaled_dot_product_attention for attention shapes.

A quick yardstick for the C++ kernels (bench/bench_kernels.cpp): same
layout ([1, H, T, D] float32), same thread count, median of several runs.

    python tools/bench_torch_sdpa.py                       # the issue's shapes
    python tools/bench_torch_sdpa.py --heads 8 --dims 64 --tokens 2048 --threads 2

Import time_sdpa() to time one shape from another script.
"""
import argparse
import statistics
import time

import torch


def time_sdpa(heads, tokens, dim, causal=True, kv_heads=None, threads=None, repeats=7, warmup=2):
    """Median seconds of one sdpa call on random [1, heads, tokens, dim] float32 q/k/v."""
    if threads is not None:
        torch.set_num_threads(threads)
    kv_heads = kv_heads or heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, generator=gen)
    k = torch.randn(1, kv_heads, tokens, dim, generator=gen)
    v = torch.randn(1, kv_heads, tokens, dim, generator=gen)
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[8])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--non-causal", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, causal={not args.non_causal}")
    print(f"{'H':>3} {'T':>6} {'D':>4} {'ms':>9}")
    for heads in args.heads:
        for dim in args.dims:
            for tokens in args.tokens:
                seconds = time_sdpa(heads, tokens, dim, causal=not args.non_causal, repeats=args.repeats)
                print(f"{heads:>3} {tokens:>6} {dim:>4} {seconds * 1e3:>9.3f}")


if __name__ == "__main__":
    main()
