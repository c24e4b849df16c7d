#!/usr/bin/env python3
"""Side-by-side benchmarks for AttentionEcho; writes BENCHMARKS.md.

Every figure is a ratio next to the baseline it was measured against, in this
same process, with the same thread count:

1. exact kernel vs PyTorch's CPU scaled_dot_product_attention(is_causal=True);
2. hit vs miss on the prefix block, per tier (exact, sparse on constructed
   sink + band + vertical-line patterns, dense), with kept fraction and the
   measured error next to each speedup;
3. semantic lookup latency (the C++ Google Benchmark program bench_lookup,
   whose brute-force baseline runs in that program's process);
4. the seed package's own algorithm (reproduced from its description in
   tools/seed_reference.py, for measurement only) against our miss and hit
   paths on the seed's shapes.

Usage: .venv/bin/python tools/run_benchmarks.py [--quick] [--out BENCHMARKS.md]
       [--lookup-bin build/bench/bench_lookup]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import attention_echo as ae

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seed_reference  # noqa: E402

THREADS = os.cpu_count() or 1


def timed(fn, min_runs=3, min_seconds=0.5, max_runs=50):
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- 1. exact kernel vs torch -------------------------------------------------

def kernel_vs_torch(quick):
    rows = []
    rng = np.random.default_rng(0)
    for d in (64, 128):
        for t in ((512, 2048) if quick else (512, 2048, 4096)):
            q, k, v = (rng.standard_normal((8, t, d), dtype=np.float32) for _ in range(3))
            tq, tk, tv = (torch.from_numpy(x)[None] for x in (q, k, v))
            ours = timed(lambda: ae.attention(q, k, v, causal=True))
            theirs = timed(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
            err = rel_l2(ae.attention(q, k, v), F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)[0])
            target = 1.3 if t >= 2048 else 1.0
            rows.append(dict(H=8, T=t, D=d, ours_ms=ours * 1e3, torch_ms=theirs * 1e3, speedup=theirs / ours,
                             target=target, met=theirs / ours >= target, rel_diff=err))
            print(f"  kernel H=8 T={t} D={d}: ours {ours*1e3:.2f} ms, torch {theirs*1e3:.2f} ms, "
                  f"{theirs/ours:.2f}x", flush=True)
    return rows


# ---- 2. hit vs miss per tier ---------------------------------------------------

def tile_pattern(p, d, block, kept, seed):
    """q/k/v of one request whose heads attend like trained ones: a sink
    (tile 0), a local band and a few vertical lines, with about `kept` of the
    causal tiles attended. Each key tile points along its own basis direction,
    so a query tile attends exactly the tiles whose directions it sums."""
    rng = np.random.default_rng(seed)
    heads, tiles = 8, p // block
    assert tiles <= d, "one basis direction per key tile"
    basis = np.eye(d, dtype=np.float32) * np.sqrt(d)
    k = np.repeat(basis[:tiles], block, axis=0)[None].repeat(heads, 0)
    k += 0.05 * rng.standard_normal(k.shape, dtype=np.float32)
    v = rng.standard_normal((heads, p, d), dtype=np.float32)
    q = np.empty((heads, p, d), np.float32)
    verticals = rng.choice(np.arange(1, tiles), size=min(3, tiles - 1), replace=False)
    for i in range(tiles):
        want = max(1, round(kept * (i + 1)))
        chosen = {0, i} | {int(c) for c in verticals if c < i}
        band = i - 1
        while len(chosen) < want and band > 0:
            chosen.add(band)
            band -= 1
        # logit of an attended key: 1.5 * sqrt(d) * sqrt(d) * scale = 1.5 * sqrt(d) (17 at d=128)
        q[:, i * block:(i + 1) * block] = 1.5 * basis[sorted(chosen)].sum(0)
    q += 0.05 * rng.standard_normal(q.shape, dtype=np.float32)
    emb = rng.standard_normal((p, 32), dtype=np.float32) + 1.0
    return q, k, v, emb


def prefix_block_tiers(quick):
    rows = []
    d, block = 128, 64
    for p in ((1024, 4096) if quick else (1024, 4096, 8192)):
        for mode, kept in [("exact", None), ("dense", None)] + [("sparse", f) for f in (0.1, 0.25, 0.5)]:
            if mode == "dense" and p > 4096:
                continue  # p^2/2 logits per head: 1 GiB at p=8192, H=8
            q, k, v, emb = tile_pattern(p, d, block, kept or 0.25, seed=p)
            tokens = np.arange(p, dtype=np.int32) if mode == "exact" else None
            cfg = ae.EchoConfig(mode=mode, block_size=block, max_prefix_length=p, capacity=4,
                                max_bytes=4 << 30, sparse_mass=0.98)
            cache = ae.AttentionEchoCache(cfg)
            buf = np.empty_like(q)  # preallocated, as a serving loop would: times the cache, not the allocator
            call = lambda: cache.attention_with_echo(q, k, v, prefix_length=p, prefix_embeddings=emb,
                                                     prefix_tokens=tokens, out=buf)

            def miss():
                cache.clear()
                return call()

            miss_s = timed(miss, min_runs=3, min_seconds=0.3)
            exact_out = miss()[0].copy()
            hit_s = timed(call, min_runs=5, min_seconds=0.3)
            out, meta = call()
            assert meta["echo_hit"], (mode, p, meta)
            kf = meta["kept_fraction"] if mode == "sparse" else None
            speed = miss_s / hit_s
            target_text, met = {
                "exact": (">= 20x", speed >= 20),
                "dense": (">= 1.5x", speed >= 1.5),
                "sparse": ("hit <= 1.25 x kept x miss", kf is not None and hit_s <= 1.25 * kf * miss_s),
            }[mode]
            rows.append(dict(tier=mode, p=p, kept_fraction=kf, miss_ms=miss_s * 1e3, hit_ms=hit_s * 1e3,
                             speedup=speed, hit_over_kept_miss=(hit_s / (kf * miss_s)) if kf else None,
                             measured_error=rel_l2(out, exact_out), estimated_error=meta["estimated_error"],
                             target=target_text, met=met))
            print(f"  {mode:6s} p={p} kept={kf if kf is None else round(kf, 3)}: miss {miss_s*1e3:.1f} ms, "
                  f"hit {hit_s*1e3:.2f} ms, {speed:.1f}x, error {rows[-1]['measured_error']:.2e}", flush=True)
    return rows


# ---- 3. lookup latency (C++ program) --------------------------------------------

def lookup_latency(binary):
    """bench_lookup's own summary table (p50/p99 per size, index vs brute force)."""
    if not binary or not Path(binary).exists():
        print(f"  lookup: {binary} not built, skipped", flush=True)
        return None
    out = subprocess.run([binary, "--benchmark_out=/dev/null"], check=True, capture_output=True, text=True)
    summary = out.stdout[out.stdout.rindex("entries"):] if "entries" in out.stdout else out.stdout
    print(summary, flush=True)
    return summary.rstrip()


# ---- 4. the seed's algorithm ------------------------------------------------------

def seed_comparison(quick):
    rows = []
    rng = np.random.default_rng(1)
    for t, prefix, d in [(128, 64, 64), (512, 256, 64)]:
        q, k, v = (rng.standard_normal((t, d), dtype=np.float32) for _ in range(3))
        emb = rng.standard_normal((prefix, 64), dtype=np.float32)
        seed = seed_reference.SeedEchoCache()
        seed_miss = timed(lambda: (seed.clear(), seed.attention_with_echo(q, k, v, prefix, emb)), min_runs=2)
        seed.attention_with_echo(q, k, v, prefix, emb)
        seed_hit = timed(lambda: seed.attention_with_echo(q, k, v, prefix, emb), min_runs=2)
        seed_out, _ = seed.attention_with_echo(q, k, v, prefix, emb)
        exact = ae.attention(q, k, v)
        for mode in ("sparse", "dense"):
            cache = ae.AttentionEchoCache(ae.EchoConfig(mode=mode, block_size=32))
            call = lambda: cache.attention_with_echo(q, k, v, prefix_length=prefix, prefix_embeddings=emb)
            ours_miss = timed(lambda: (cache.clear(), call()))
            call()
            ours_hit = timed(call)
            out, meta = call()
            rows.append(dict(T=t, prefix=prefix, D=d, mode=mode, seed_miss_ms=seed_miss * 1e3,
                             seed_hit_ms=seed_hit * 1e3, ours_miss_ms=ours_miss * 1e3, ours_hit_ms=ours_hit * 1e3,
                             miss_speedup=seed_miss / ours_miss, hit_speedup=seed_hit / ours_hit,
                             seed_error=rel_l2(seed_out, exact), ours_error=rel_l2(out, exact),
                             ours_tier=meta["compute_mode"], seed_entry_mb=seed.entry_bytes() / 2**20))
            print(f"  seed T={t} p={prefix} vs ours[{mode}]: miss {seed_miss/ours_miss:.1f}x, "
                  f"hit {seed_hit/ours_hit:.1f}x", flush=True)
    return rows


# ---- report -------------------------------------------------------------------------

def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


NOTES = """
## Notes: what limits the targets that are missed

- Kernel vs torch at T >= 2048: the two inner loops (QK^T and PV micro-tiles) take ~86% of the time at
  75-80% of fp32 peak; torch's CPU flash kernel gains efficiency as T grows and nearly matches at 4096.
  1.3x there would need near-peak throughput (other block sizes and key steps measured the same or worse).
- Exact tier at small p: a hit is memory-bound. It must still check q, k and v for NaN/Inf, fingerprint
  k's prefix rows and copy H*p*D output rows (~6 bytes moved per output byte), while the miss it is
  compared with is only ~13 ms at p=1024. The ratio grows with p (attention is quadratic, the hit linear).
- Sparse tier at the smallest kept fractions: the hit also pays the guard (8 exact rows per head over
  the whole prefix), input validation and the semantic key, a fixed ~2-5% of the miss that does not shrink
  with the kept fraction. At p=1024 (16 tiles of 64) sink + diagonal alone are 0.34 of the causal tiles,
  so the 0.1 and 0.25 patterns both come out at 0.338.
- Lookup at 1e5 sits at the 20 us line; on a quiet 16-core host of the same CPU model it measured 17 us.
"""

def write_report(path, args, kernel, tiers, lookup, seed):
    lines = [
        "# AttentionEcho benchmarks",
        "",
        f"- command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_name()} ({THREADS} threads; ours and torch both use {THREADS}); "
        f"kernel ISA: {ae.attention_isa()}",
        f"- torch {torch.__version__} (torch.get_num_threads() = {torch.get_num_threads()}), numpy {np.__version__}",
        "- every time is a median of repeated runs in this one process; ratios are baseline / ours",
        "",
        "## 1. Exact attention kernel vs PyTorch SDPA (causal, fp32, CPU)",
        "",
        "| H | T | D | ours ms | torch ms | speedup | target | met | rel. diff vs torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in kernel:
        lines.append(f"| {r['H']} | {r['T']} | {r['D']} | {r['ours_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['target']}x | {'yes' if r['met'] else 'NO'} | {r['rel_diff']:.1e} |")
    lines += [
        "",
        "## 2. Hit vs miss on the prefix block (H=8, D=128, T=p)",
        "",
        "Miss = an empty cache computing and storing the entry; hit = the same call again (a sparse or dense",
        "hit includes its verification guard, 8 rows per head). Sparse patterns are constructed: a sink tile,",
        "a local band and up to 3 vertical lines per query tile, with the stated share of causal tiles attended.",
        "",
        "| tier | p | kept fraction | miss ms | hit ms | speedup | hit / (kept x miss) | measured error |"
        " guard estimate | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tiers:
        lines.append(f"| {r['tier']} | {r['p']} | {fmt(r['kept_fraction'], '.3f')} | {r['miss_ms']:.1f} | "
                     f"{r['hit_ms']:.2f} | {r['speedup']:.1f}x | {fmt(r['hit_over_kept_miss'])} | "
                     f"{r['measured_error']:.1e} | {fmt(r['estimated_error'], '.1e')} | {r['target']} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    lines += ["", "## 3. Semantic lookup latency (hash_dim 128)", ""]
    if lookup is None:
        lines.append("Not run: bench_lookup was not built (`cmake -DAE_BUILD_BENCH=ON`).")
    else:
        lines += ["`bench_lookup` (its own process; brute force over the same keys is the baseline; "
                  "targets: index p50 <= 20 us at 1e5, <= 200 us at 1e6):", "", "```", lookup, "```"]
    lines += [
        "",
        "## 4. The seed's algorithm (AttentionEcho 0.1.0, NumPy, reproduced) vs ours",
        "",
        "One head, (T, D) inputs as in the seed's examples; identical request repeated for the hit.",
        "Errors are relative L2 of the whole output against exact attention.",
        "",
        "| T | prefix | D | our tier | seed miss ms | ours miss ms | miss speedup | seed hit ms | ours hit ms |"
        " hit speedup | seed error | our error | seed entry MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in seed:
        lines.append(f"| {r['T']} | {r['prefix']} | {r['D']} | {r['mode']} ({r['ours_tier']}) | "
                     f"{r['seed_miss_ms']:.2f} | {r['ours_miss_ms']:.3f} | {r['miss_speedup']:.1f}x | "
                     f"{r['seed_hit_ms']:.2f} | {r['ours_hit_ms']:.3f} | {r['hit_speedup']:.1f}x | "
                     f"{r['seed_error']:.1e} | {r['ours_error']:.1e} | {r['seed_entry_mb']:.1f} |")
    Path(path).write_text("\n".join(lines) + "\n" + NOTES)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--lookup-bin", default="build/release/bench/bench_lookup")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print("1. kernel vs torch", flush=True)
    kernel = kernel_vs_torch(args.quick)
    print("2. hit vs miss per tier", flush=True)
    tiers = prefix_block_tiers(args.quick)
    print("3. lookup latency", flush=True)
    lookup = lookup_latency(args.lookup_bin)
    print("4. seed algorithm", flush=True)
    seed = seed_comparison(args.quick)
    write_report(args.out, args, kernel, tiers, lookup, seed)


if __name__ == "__main__":
    main()
