"""The kept tiles chosen from the sampled tile mass (tile_mass_capture.hpp)
against those chosen from the exact mass, on the bundled llama2.c model's
real q, k, v (tools/llama_reference.py over held-out text, bf16 on the GPU),
layer by layer. Needs the CUDA shim built with cuDNN (the LSE comes from it).

    python3 bench/cuda/model_selection.py --shim build/cuda/libae_cuda_shim.so \
        [--model models/echo-llama-6m/model.bin] [--tokens 4096] [--json out.json]

Per layer, block (64: the cache's default, 128) and keep_mass (0.98: the
cache's default sparse_mass, 0.9): the share of each (head, query tile)'s
exact mass that the tiles chosen from 16, 8 or 4 sampled rows keep (worst and
mean), the kept share of the causal tiles, and the tiles the choices differ in.
"""

import argparse
import ctypes
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cuda  # noqa: E402  (load_shim, check, select)


def problem_args(q, k, v, out):
    _, H, T, D = q.shape
    views = [(ctypes.c_void_p(t.data_ptr()), t.stride(1), t.stride(2)) for t in (q, k, out)]
    (qp, qh, qt), (kp, kh, kt), (op, oh, ot) = views
    return [qp, qh, qt, kp, ctypes.c_void_p(v.data_ptr()), kh, kt, op, oh, ot, 1, H, k.shape[1], T, D, 1, 0, 0,
            1.0 / math.sqrt(D)]


def model_qkv(path, tokens):
    """Each layer's (q, k, v) as [1, heads, T, D] bf16 CUDA tensors over held-out text."""
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
    import llama_reference

    c = llama_reference.load_checkpoint(path, dtype=torch.float32)
    with open(os.path.join(os.path.dirname(path), "heldout.txt"), "rb") as f:
        text = f.read()[: tokens - 1]
    layers = []

    def on_qkv(layer, q, k, v):
        layers.append([x.transpose(0, 1)[None].to("cuda", torch.bfloat16).contiguous() for x in (q, k, v)])

    llama_reference.forward(c, [1] + [b + 3 for b in text], on_qkv=on_qkv)
    return layers


def sample_counts(block):
    """The sampled rows per tile compared: 4 of 64 is the cache's default."""
    return (16, 8, 4) if block == 64 else (16, 8)


def compare(lib, q, k, v, block, keeps):
    H, T = q.shape[1], q.shape[2]
    n = (T + block - 1) // block
    out = torch.empty_like(q)
    args = problem_args(q, k, v, out)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    lse = torch.empty(H, T, device="cuda", dtype=torch.float32)
    bench_cuda.check(lib, lib.ae_cudnn_attention(*args, ctypes.c_void_p(lse.data_ptr()), stream))
    masses = {}
    for samples in (block, *sample_counts(block)):
        m = torch.zeros(H, n, n, device="cuda", dtype=torch.float32)
        bench_cuda.check(lib, lib.ae_capture_mass(*args, ctypes.c_void_p(lse.data_ptr()), T, block, samples,
                                                  ctypes.c_void_p(m.data_ptr()), stream))
        masses[samples] = m.double()
    exact = masses[block]
    causal = H * n * (n + 1) // 2
    rows = []
    for keep in keeps:
        exact_kept = bench_cuda.select(exact, keep)
        row = {"block": block, "keep": keep, "exact_kept_share": exact_kept.sum().item() / causal}
        for samples in sample_counts(block):
            kept = bench_cuda.select(masses[samples], keep)
            covered = (exact * kept).sum(-1) / exact.sum(-1)
            row[f"s{samples}"] = {"worst_kept_mass": covered.min().item(), "mean_kept_mass": covered.mean().item(),
                                  "kept_share": kept.sum().item() / causal,
                                  "differing_tiles": (kept != exact_kept).sum().item() / causal}
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shim", required=True)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models",
                                                    "echo-llama-6m", "model.bin"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json")
    args = ap.parse_args()
    lib = bench_cuda.load_shim(args.shim)
    results = []
    for layer, (q, k, v) in enumerate(model_qkv(args.model, args.tokens)):
        for block in (64, 128):
            for row in compare(lib, q, k, v, block, (0.98, 0.9)):
                row["layer"] = layer
                results.append(row)
                print(f"layer {layer} block {block:3d} keep {row['keep']:.2f}: exact keeps "
                      f"{row['exact_kept_share']:.3f} of tiles; "
                      + "; ".join(f"{s[1:]}/{block}: kept mass worst {row[s]['worst_kept_mass']:.4f} mean "
                                  f"{row[s]['mean_kept_mass']:.4f}, share {row[s]['kept_share']:.3f}, differing "
                                  f"{row[s]['differing_tiles']:.4f}"
                                  for s in (f"s{n}" for n in sample_counts(block))), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
