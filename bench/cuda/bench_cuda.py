"""Side-by-side timing of AttentionEcho's CUDA kernels and PyTorch's attention
in one process, on the same bf16 tensors and the same stream.

    python3 bench/cuda/bench_cuda.py --shim build/cuda/libae_cuda_shim.so \
        [--tokens 4096 8192 16384 32768] [--json out.json] [--compare other.so ...]

Shape: H = 32 query heads, Hkv = 8, D = 128, causal, bf16. Rows per T:
  miss        our exact kernel, with and without the tile-mass capture
              (block 128 and 64), against SDPA (cuDNN, flash) and FlexAttention
  cudnn       our cuDNN miss (cudnn-frontend graph; alone, with the row LSE),
              the tile-mass capture from that LSE alone (16, 8 or all 128
              rows of each 128-tile), and the routed miss: cuDNN + capture
              (timed in turns with cuDNN's miss alone, its overhead is over that)
  selection   the kept 128-tiles (keep_mass 0.9) chosen from sampled mass
              against the exact mass, on random and on peaked inputs (a sink
              and a local band, as bench_echo.py makes them): the share of
              the exact mass the sampled choice keeps per (head, query tile)
  sparse      our kernel over a kept-tile plan (random 128-blocks, always the
              sink and the diagonal) at kept 0.5 / 0.3 / 0.1, against
              FlexAttention with the same block mask; with --compare, other
              builds' sparse kernels on the same plans ("compare i" rows,
              vs_ours = their time / ours), so two kernels are measured in
              one process
  exact hit   the exact tier's copy of the prefix rows (p = T; with
              --compare, other builds' copies in turns with ours), torch's
              copy of the same bytes between contiguous tensors (what a copy
              can do on this GPU), and that copy plus 512 suffix rows
              computed exactly; --exact-hit-only: these rows and SDPA's
              cuDNN miss (the fastest dense miss) alone
  flashinfer  --flashinfer-only: SDPA's cuDNN miss, then at each kept share
              one random kept-tile table per kv head (the query heads of a
              GQA group share it: FlashInfer's block-sparse prefill takes a
              mask per kv head), served by our kernel, FlashInfer's
              VariableBlockSparseAttentionWrapper (flashinfer-python, its
              own backend choice) and FlexAttention, outputs compared
Times are medians of CUDA-event-timed repeats after warm-up; TFLOP/s counts
the causal attention's 2 * H * T^2 * D (sparse: the kept tiles' share).
"""

import argparse
import ctypes
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, HKV, D, BLOCK = 32, 8, 128, 128
# The capture's sampled rows per tile, timed and checked: (block, samples...);
# 64 is the cache's default tile (EchoConfig.block_size); the capture takes 8.
CAPTURE_SAMPLES = ((128, (16, 8)), (64, (8, 4)))
PEAK = 790.0  # bf16 dense TFLOP/s measured on this H200 type (8192^3 matmul)


def load_shim(path):
    lib = ctypes.CDLL(path)
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    problem = [p, i64, i64, p, p, i64, i64, p, i64, i64, i32, i32, i32, i32, i32, i32, i32, i32, f32]
    lib.ae_last_error.restype = ctypes.c_char_p
    lib.ae_attention.argtypes = problem + [p]
    lib.ae_attention_mass.argtypes = problem + [i32, i32, p, p]
    lib.ae_plan_create.argtypes = [p, p, i32, i32, i32, i32, p]
    lib.ae_plan_create.restype = p
    lib.ae_plan_destroy.argtypes = [p]
    lib.ae_sparse.argtypes = problem + [p, p]
    lib.ae_copy_rows.argtypes = [p, i64, i64, p, i64, i64, i32, i32, i32, i32, i32, p]
    lib.ae_cudnn_attention.argtypes = problem + [p, p]
    lib.ae_capture_mass.argtypes = problem + [p, i32, i32, i32, p, p]
    lib.ae_miss_mass.argtypes = problem + [i32, i32, i32, p]
    lib.ae_walk.argtypes = problem + [p, p]
    lib.ae_walk_mass.argtypes = problem + [i32, i32, p, p]
    return lib


def check(lib, status):
    if status != 0:
        raise RuntimeError(lib.ae_last_error().decode())


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def view(t):
    """(pointer, head stride, token stride) of a [1, heads, tokens, D] tensor."""
    return ctypes.c_void_p(t.data_ptr()), t.stride(1), t.stride(2)


def problem_args(q, k, v, out, query_offset=0):
    T = k.shape[2]
    qp, qh, qt = view(q)
    kp, kh, kt = view(k)
    vp, _, _ = view(v)
    op, oh, ot = view(out)
    return [qp, qh, qt, kp, vp, kh, kt, op, oh, ot, 1, H, HKV, T, D, 1, 0, query_offset, 1.0 / math.sqrt(D)]


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved_ms(fns, reps, rounds=3):
    """Each function's median over rounds of its median_ms, the functions
    taking turns in every round: a drift in the GPU's speed (clocks, other
    work) then moves them alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(median_ms(fn, reps))
    return [statistics.median(t) for t in times]


def exact_hit(lib, others, q, k, v, out, reps, record, misses):
    """The exact tier's hit at p = T: our copy of the cached rows (and each
    --compare shim's, in turns), torch's contiguous copy of the same bytes,
    and our copy plus 512 suffix rows on our kernel; each row's time against
    every miss in `misses` (name -> ms) as <name>_over."""
    T = q.shape[2]
    cached = torch.randn_like(q)
    sp, sh, st = view(cached)
    op, oh, ot = view(out)

    def copy(shim, rows):
        return lambda: check(shim, shim.ae_copy_rows(sp, sh, st, op, oh, ot, 1, H, T, D, rows, stream()))

    def over(ms):
        return {f"{name}_over": miss / ms for name, miss in misses.items()}

    gb = 2 * cached.numel() * cached.element_size() / 1e9  # read and written
    times = interleaved_ms([copy(lib, T)] + [copy(other, T) for other in others] + [lambda: out.copy_(cached)], reps)
    record(T, "exact hit: copy p=T rows", times[0], 0.0, tb_per_s=gb / times[0], **over(times[0]))
    for i, ms in enumerate(times[1:-1]):
        record(T, f"compare {i} copy p=T rows", ms, 0.0, tb_per_s=gb / ms, vs_ours=ms / times[0])
    record(T, "torch copy_ (contiguous)", times[-1], 0.0, tb_per_s=gb / times[-1])
    p = T - 512
    suffix = problem_args(q[:, :, p:], k, v, out[:, :, p:], query_offset=p)

    def copy_and_suffix():
        copy(lib, p)()
        check(lib, lib.ae_attention(*suffix, stream()))
    ms = median_ms(copy_and_suffix, reps)
    record(T, "exact hit: copy + 512 rows", ms, **over(ms))


def random_kept(T, kept, generator):
    """Random kept 128-tiles per (head, query tile) over the causal tiles:
    tile 0 and the diagonal always, the others with one probability chosen so
    that the kept share of all causal tiles is `kept`. Returns the bool table
    [H, n, n] and the CSR arrays of TileSet."""
    n = T // BLOCK
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device="cuda"))
    forced = torch.eye(n, dtype=torch.bool, device="cuda")
    forced[:, 0] = True
    total, n_forced = causal.sum().item(), forced.sum().item()
    prob = max(0.0, (kept * total - n_forced) / (total - n_forced))
    table = (torch.rand(H, n, n, device="cuda", generator=generator) < prob) & causal
    table |= forced
    return (table, *tile_set(table))


def tile_set(table):
    """TileSet's CSR arrays of a kept table [H, n, n] and its kept share of
    the causal tiles: (offsets, cols, share)."""
    n = table.shape[-1]
    counts = table.sum(-1).flatten()
    offsets = torch.zeros(H * n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts.cpu(), 0)
    cols = table.nonzero()[:, 2].to(torch.int16).cpu()  # row-major order: ascending per (h, I)
    share = table.sum().item() / (H * n * (n + 1) / 2)
    return offsets.to(torch.int32).contiguous(), cols.contiguous(), share


def sdpa_cudnn(q, k, v):
    """SDPA on its cuDNN backend, causal, GQA: the fastest dense miss."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def group_kept(T, kept, generator):
    """random_kept's table drawn per kv head and shared by its GQA group's
    query heads: (kv table [HKV, n, n], then random_kept's four results)."""
    kv_table = random_kept(T, kept, generator)[0][:HKV].contiguous()
    table = kv_table.repeat_interleave(H // HKV, dim=0)
    return (kv_table, table, *tile_set(table))


def flashinfer_rows(lib, q, k, v, out, T, kepts, gen, flex, reps, record):
    """--flashinfer-only's rows at one T (module docstring)."""
    import flashinfer

    dense = median_ms(lambda: sdpa_cudnn(q, k, v), reps)
    record(T, "sdpa cudnn", dense)
    n = T // BLOCK
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    sizes = torch.full((HKV, n), BLOCK, dtype=torch.int32, device="cuda")
    base = problem_args(q, k, v, out)
    for kept in kepts:
        kv_table, table, offsets, cols, share = group_kept(T, kept, gen)
        plan = lib.ae_plan_create(ctypes.c_void_p(offsets.data_ptr()), ctypes.c_void_p(cols.data_ptr()), H, n, BLOCK,
                                  T, stream())
        if not plan:
            raise RuntimeError(lib.ae_last_error().decode())
        ours = lambda: check(lib, lib.ae_sparse(*base, ctypes.c_void_p(plan), stream()))
        wrapper = flashinfer.VariableBlockSparseAttentionWrapper(workspace)
        wrapper.plan(kv_table, sizes, sizes, H, HKV, D, causal=True, q_data_type=torch.bfloat16)
        fi = lambda: wrapper.run(q[0], k[0], v[0])
        mask = flex_mask(table)
        fl = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)
        ours()
        fi_out, fl_out = fi(), fl()
        torch.cuda.synchronize()
        fi_out = fi_out.reshape(q.shape) if fi_out.shape[0] == H else fi_out.transpose(0, 1).reshape(q.shape)
        ref = fl_out.float()
        ours_ms, fi_ms, fl_ms = (median_ms(f, reps) for f in (ours, fi, fl))
        over = lambda ms: {"over_share_x_dense": ms / (share * dense)}
        record(T, f"ours group kept {kept}", ours_ms, share, kept_share=share, vs_flashinfer=fi_ms / ours_ms,
               vs_flex=fl_ms / ours_ms, diff_vs_flex=((out.float() - ref).norm() / ref.norm()).item(), **over(ours_ms))
        record(T, f"flashinfer kept {kept}", fi_ms, share, kept_share=share, backend=wrapper._backend,
               diff_vs_flex=((fi_out.float() - ref).norm() / ref.norm()).item(), **over(fi_ms))
        record(T, f"flex group kept {kept}", fl_ms, share, kept_share=share, **over(fl_ms))
        lib.ae_plan_destroy(ctypes.c_void_p(plan))


def flex_mask(table):
    """FlexAttention's BlockMask for kept causal 128-tiles table [H, n, n]:
    the diagonal tiles partial (causal mask_mod), the kept tiles below it full,
    which is what create_block_mask builds, without evaluating the mask per
    element over T x T."""
    from torch.nn.attention.flex_attention import BlockMask

    n = table.shape[-1]
    ar = torch.arange(n, device="cuda", dtype=torch.int32)
    full = table & torch.tril(torch.ones(n, n, dtype=torch.bool, device="cuda"), diagonal=-1)
    full_num = full.sum(-1, dtype=torch.int32)[None]
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]
    num = torch.ones(1, H, n, dtype=torch.int32, device="cuda")
    idx = ((ar[:, None] + ar[None, :]) % n).expand(H, n, n).contiguous()[None]
    # The mask_mod carries the whole mask too (eager flex evaluates only it).
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=lambda b, h, qi, ki: (qi >= ki) & table[h, qi // BLOCK, ki // BLOCK])


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def select(mass, keep):
    """select_tiles (attention_kernel.hpp) on [H, n, n] mass in torch: the sink
    and the diagonal, then the heaviest others until keep of the row's mass."""
    n = mass.shape[-1]
    forced = torch.eye(n, dtype=torch.bool, device=mass.device)
    forced[:, 0] = True
    others = mass.masked_fill(forced, 0.0)
    need = keep * mass.sum(-1, keepdim=True) - (mass * forced).sum(-1, keepdim=True)
    values, order = others.sort(-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the heavier others
    take = (before < need) & (values > 0)
    kept = torch.zeros_like(take).scatter(-1, order, take)
    return kept | forced


def selection_stats(lib, q, k, v, out, block, sample_counts, keep=0.9):
    """Kept tiles from sampled mass (sample_counts rows of each block) against
    the exact mass: share of the exact mass kept (worst and mean over (head,
    query tile)), kept share of tiles, and the tiles the two choices differ in."""
    T = k.shape[2]
    n = T // block
    base = problem_args(q, k, v, out)
    lse = torch.empty(H, T, device="cuda", dtype=torch.float32)
    check(lib, lib.ae_cudnn_attention(*base, ptr(lse), stream()))
    masses = {}
    for samples in (block, *sample_counts):
        m = torch.zeros(H, n, n, device="cuda", dtype=torch.float32)
        check(lib, lib.ae_capture_mass(*base, ptr(lse), T, block, samples, ptr(m), stream()))
        masses[samples] = m.double()
    exact = masses[block]
    exact_kept = select(exact, keep)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device="cuda")).sum().item() * H
    stats = {"exact_kept_share": exact_kept.sum().item() / causal}
    for samples in sample_counts:
        kept = select(masses[samples], keep)
        covered = (exact * kept).sum(-1) / exact.sum(-1)
        stats[f"s{samples}/{block}"] = {"worst_kept_mass": covered.min().item(), "mean_kept_mass": covered.mean().item(),
                                "kept_share": kept.sum().item() / causal,
                                "differing_tiles": (kept != exact_kept).sum().item() / causal,
                                "max_abs_mass_err": (masses[samples] - exact).abs().max().item()}
    return stats


def peaked(T, gen):
    """bench_echo.py's inputs: q_t = 3 (k_t + k_0) + noise, a sink and a local band per head."""
    k = torch.randn(1, HKV, T, D, device="cuda", generator=gen)
    v = torch.randn(1, HKV, T, D, device="cuda", generator=gen)
    kq = k.repeat_interleave(H // HKV, dim=1)
    q = 3.0 * (kq + kq[:, :, :1]) + 0.3 * torch.randn(1, H, T, D, device="cuda", generator=gen)
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def tflops(T, ms, share=1.0):
    return 2.0 * H * T * T * D * share / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shim", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    ap.add_argument("--ours-only", action="store_true", help="skip the PyTorch baselines (compare builds)")
    ap.add_argument("--no-selection", dest="selection", action="store_false",
                    help="skip the sampled-mass selection check")
    ap.add_argument("--capture-only", action="store_true", help="only our miss, the cuDNN miss and the capture rows")
    ap.add_argument("--no-sparse", dest="skip_sparse", action="store_true",
                    help="skip the sparse, flex and exact-hit rows")
    ap.add_argument("--exact-hit-only", action="store_true",
                    help="only SDPA's cuDNN miss and the exact-hit rows")
    ap.add_argument("--flashinfer-only", action="store_true",
                    help="only SDPA's cuDNN miss and the sparse kernels against FlashInfer's on GQA-shared masks")
    ap.add_argument("--compare", metavar="SHIM", nargs="+", default=[],
                    help="other builds' shims: their sparse kernels (and row copies) timed beside ours")
    ap.add_argument("--json")
    args = ap.parse_args()
    lib = load_shim(args.shim)
    others = [load_shim(path) for path in args.compare]
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cudnn_version = lib.ae_cudnn_version()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__} (its cuDNN "
          f"{torch.backends.cudnn.version()}), our cuDNN {cudnn_version or 'absent'}, "
          f"H={H} Hkv={HKV} D={D} bf16 causal")
    results = []

    def record(T, name, ms, share=1.0, **extra):
        row = {"T": T, "kernel": name, "ms": ms, "tflops": tflops(T, ms, share), **extra}
        row["peak_fraction"] = row["tflops"] / PEAK
        results.append(row)
        more = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        print(f"T={T:6d} {name:28s} {ms:8.3f} ms {row['tflops']:6.1f} TFLOP/s ({row['peak_fraction']:.0%}) {more}",
              flush=True)

    for T in args.tokens:
        reps = 20 if T <= 8192 else 8
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = torch.empty_like(q)
        base = problem_args(q, k, v, out)
        if args.flashinfer_only:
            flashinfer_rows(lib, q, k, v, out, T, args.kept, gen, flex, reps, record)
            continue
        if args.exact_hit_only:
            cudnn_ms = median_ms(lambda: sdpa_cudnn(q, k, v), reps)
            record(T, "sdpa cudnn", cudnn_ms)
            exact_hit(lib, others, q, k, v, out, reps, record, {"sdpa_cudnn": cudnn_ms})
            continue

        def ours():
            check(lib, lib.ae_attention(*base, stream()))

        def ours_mass(block):
            return lambda: check(lib, lib.ae_attention_mass(*base, T, block, None, stream()))

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float()
        ours()
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()  # bf16 vs bf16: a few 1e-3
        miss = median_ms(ours, reps)
        record(T, "ours exact (miss)", miss, rel_err=err)
        for block in () if args.capture_only else (128, 64):
            ms = median_ms(ours_mass(block), reps)
            record(T, f"ours exact + mass b{block}", ms, overhead=ms / miss - 1)
        if cudnn_version:
            lse = torch.empty(H, T, device="cuda", dtype=torch.float32)
            out.fill_(float("nan"))
            torch.cuda.synchronize()
            first = time.perf_counter()  # this shape's first call: the graph is built in it
            check(lib, lib.ae_cudnn_attention(*base, None, stream()))
            torch.cuda.synchronize()
            first = (time.perf_counter() - first) * 1e3
            err = ((out.float() - ref).norm() / ref.norm()).item()
            cudnn = lambda: check(lib, lib.ae_cudnn_attention(*base, None, stream()))
            cudnn_ms = median_ms(cudnn, reps)
            record(T, "cudnn miss", cudnn_ms, rel_err=err, ours_over=miss / cudnn_ms, first_call_ms=first)
            ms = median_ms(lambda: check(lib, lib.ae_cudnn_attention(*base, ptr(lse), stream())), reps)
            record(T, "cudnn miss + lse", ms, overhead=ms / cudnn_ms - 1)
            for block, sample_counts in CAPTURE_SAMPLES:
                for samples in (*sample_counts, block):
                    capture = lambda: check(lib, lib.ae_capture_mass(*base, ptr(lse), T, block, samples, None,
                                                                     stream()))
                    ms = median_ms(capture, reps)
                    # TFLOP/s of the work it does: Q K^T of the sampled rows, half the FLOPs of their attention
                    record(T, f"capture {samples}/{block} rows alone", ms, samples / block / 2,
                           of_cudnn_miss=ms / cudnn_ms)
                    if samples == block:
                        continue
                    routed = lambda: check(lib, lib.ae_miss_mass(*base, T, block, samples, stream()))
                    # Against cuDNN's miss timed in turns with it: at 16k cuDNN's median moved 6% between rounds.
                    cudnn_again, ms = interleaved_ms([cudnn, routed], reps)
                    record(T, f"cudnn miss + capture {samples}/{block}", ms, overhead=ms / cudnn_again - 1,
                           vs_ours_mass=ms / miss, cudnn_ms=cudnn_again)
        # The dense walk (what a miss runs before its shape earns cuDNN) and
        # the walk recording the exact tile mass in the same pass, in turns.
        walk = lambda: check(lib, lib.ae_walk(*base, None, stream()))
        walk()
        torch.cuda.synchronize()
        walk_err = ((out.float() - ref).norm() / ref.norm()).item()
        for block in (64, 128):
            walk_mass = lambda: check(lib, lib.ae_walk_mass(*base, T, block, None, stream()))
            walk_ms, ms = interleaved_ms([walk, walk_mass], reps)
            if block == 64:
                record(T, "walk miss", walk_ms, rel_err=walk_err,
                       **({"of_cudnn_miss": walk_ms / cudnn_ms} if cudnn_version else {}))
            record(T, f"walk miss + exact mass b{block}", ms, overhead=ms / walk_ms - 1,
                   **({"of_cudnn_miss": ms / cudnn_ms} if cudnn_version else {}))
        del ref
        if args.capture_only:
            del q, k, v, out
            torch.cuda.empty_cache()
            continue

        def sparse_run(shim, offsets, cols):
            """A call of shim's sparse kernel over a plan of these kept tiles."""
            plan = shim.ae_plan_create(ctypes.c_void_p(offsets.data_ptr()), ctypes.c_void_p(cols.data_ptr()), H,
                                       T // BLOCK, BLOCK, T, stream())
            if not plan:
                raise RuntimeError(shim.ae_last_error().decode())
            plans.append((shim, plan))
            return lambda: check(shim, shim.ae_sparse(*base, ctypes.c_void_p(plan), stream()))

        def ours_sparse(kept):
            """Times our sparse kernel on random kept tiles (and --compare's on the
            same tiles); returns (ms, share, table, run)."""
            table, offsets, cols, share = random_kept(T, kept, gen)
            run = sparse_run(lib, offsets, cols)
            ms = median_ms(run, reps)
            for i, other in enumerate(others):
                other_ms = median_ms(sparse_run(other, offsets, cols), reps)
                record(T, f"compare {i} sparse kept {kept}", other_ms, share, vs_ours=other_ms / ms)
            return ms, share, table, run

        if cudnn_version and args.selection:
            for name, (sq, sk, sv) in (("random", (q, k, v)), ("peaked", peaked(T, gen))):
                stats = {}
                for block, sample_counts in CAPTURE_SAMPLES:
                    found = selection_stats(lib, sq, sk, sv, out, block, sample_counts)
                    stats[f"exact_kept_share/{block}"] = found.pop("exact_kept_share")
                    stats.update(found)
                results.append({"T": T, "selection": name, **stats})
                print(f"T={T:6d} selection {name}: "
                      + "; ".join(f"exact keeps {v:.3f} of {s[len('exact_kept_share/'):]}-tiles"
                                  if not isinstance(v, dict) else
                                  f"{s}: kept mass worst {v['worst_kept_mass']:.4f} mean {v['mean_kept_mass']:.4f}, "
                                  f"share {v['kept_share']:.3f}, differing {v['differing_tiles']:.4f}, "
                                  f"max |err| {v['max_abs_mass_err']:.2e}"
                                  for s, v in stats.items()), flush=True)

        plans = []
        if args.ours_only:
            for kept in args.kept:
                ms, share, _, _ = ours_sparse(kept)
                record(T, f"ours sparse kept {kept}", ms, share, kept_share=share,
                       over_share_x_miss=ms / (share * miss))
            for shim, plan in plans:
                shim.ae_plan_destroy(ctypes.c_void_p(plan))
            continue
        sdpa = {}
        for backend, name in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            try:
                sdpa[name] = median_ms(run, reps)
                record(T, f"sdpa {name}", sdpa[name], ours_over=miss / sdpa[name])
            except RuntimeError as e:
                print(f"T={T} sdpa {name}: unavailable ({str(e).splitlines()[0]})")
        fastest_sdpa = min(sdpa.values()) if sdpa else float("nan")
        if args.skip_sparse:
            del q, k, v, out
            torch.cuda.empty_cache()
            continue

        n = T // BLOCK
        causal_mask = flex_mask(torch.tril(torch.ones(H, n, n, dtype=torch.bool, device="cuda")))
        flex_causal = median_ms(lambda: flex(q, k, v, block_mask=causal_mask, enable_gqa=True), reps)
        record(T, "flex causal", flex_causal)

        for kept in args.kept:
            ms, share, table, sparse = ours_sparse(kept)
            mask = flex_mask(table)
            flex_out = flex(q, k, v, block_mask=mask, enable_gqa=True)
            sparse()
            torch.cuda.synchronize()
            agree = ((out.float() - flex_out.float()).norm() / flex_out.float().norm()).item()
            flex_ms = median_ms(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True), reps)
            record(T, f"ours sparse kept {kept}", ms, share, kept_share=share, vs_flex=flex_ms / ms,
                   vs_fastest_sdpa=fastest_sdpa / ms, over_share_x_miss=ms / (share * miss), diff_vs_flex=agree)
            record(T, f"flex sparse kept {kept}", flex_ms, share, kept_share=share)
        for shim, plan in plans:
            shim.ae_plan_destroy(ctypes.c_void_p(plan))

        exact_hit(lib, others, q, k, v, out, reps, record, {"miss": miss, "fastest_sdpa": fastest_sdpa})
        del q, k, v, out
        torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
