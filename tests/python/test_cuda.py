"""CUDA tensors through attention_with_echo, attention_echo.torch and
attention_echo.hf: they stay on the device (no host copy of q, k or v, checked
with the torch profiler) and come back as CUDA tensors. Skips without a GPU or
without a build with AE_CUDA."""

import json

import pytest

torch = pytest.importorskip("torch")

from attention_echo import AttentionEchoCache, EchoConfig, _core  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _core.has_cuda), reason="needs a CUDA GPU and a build with AE_CUDA"
)

H, HKV, D = 8, 2, 128


def qkv(tokens, seed, noise=0.0, dtype=torch.bfloat16):
    """(H, T, D) q and (Hkv, T, D) k, v on the GPU, with peaked attention (a
    sink and a local band) so the sparse tier keeps few tiles; noise > 0 is a
    near-duplicate of the same seed."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(HKV, tokens, D, generator=g)
    v = torch.randn(HKV, tokens, D, generator=g)
    if noise:
        j = torch.Generator().manual_seed(seed + 1000)
        k = k + noise * torch.randn(k.shape, generator=j)
        v = v + noise * torch.randn(v.shape, generator=j)
    kq = k.repeat_interleave(H // HKV, dim=0)
    q = 3.0 * (kq + kq[:, :1]) + 0.3 * torch.randn(H, tokens, D, generator=g)
    return [x.to("cuda", dtype) for x in (q, k, v)]


def sdpa(q, k, v):
    rep = q.shape[0] // k.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q[None], k.repeat_interleave(rep, 0)[None], v.repeat_interleave(rep, 0)[None], is_causal=True
    )[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def embeddings(seed, prefix):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, generator=g).repeat(prefix, 1)


def config(**kw):
    return EchoConfig(capacity=16, max_prefix_length=8192, block_size=64, **kw)


def test_miss_exact_and_sparse_hits_stay_on_the_gpu():
    cache = AttentionEchoCache(config())
    q, k, v = qkv(2048, 1)
    tokens = list(range(2048))
    out, meta = cache.attention_with_echo(q, k, v, 2048, embeddings(1, 2048), prefix_tokens=tokens)
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == q.shape
    assert meta["tier"] == "none"
    assert rel(out, sdpa(q, k, v)) < 1e-2
    again, meta = cache.attention_with_echo(q, k, v, 2048, embeddings(1, 2048), prefix_tokens=tokens)
    assert meta["tier"] == "exact" and torch.equal(again, out)
    q2, k2, v2 = qkv(2048, 1, noise=0.02)
    near, meta = cache.attention_with_echo(q2, k2, v2, 2048, embeddings(1, 2048))
    assert meta["tier"] == "sparse" and meta["kept_fraction"] < 0.5
    assert rel(near, sdpa(q2, k2, v2)) < 0.05
    assert cache.stats["bytes"] >= H * 2048 * D * 2  # the exact rows, in device memory


def test_broadcast_kv_heads_are_served_like_contiguous_ones():
    """An expand()ed kv head (stride 0 between heads: the tensor maps of the
    sparse kernel cannot step by 0) is copied on the device and served like
    its contiguous copy, on the miss and on the sparse hit."""
    q, k, v = qkv(2048, 4)
    q2, k2, v2 = qkv(2048, 4, noise=0.02)
    k0, v0, k20, v20 = (x[:1].expand(HKV, -1, -1) for x in (k, v, k2, v2))
    assert k0.stride(0) == 0
    q, q2 = q[: H // HKV].repeat(HKV, 1, 1), q2[: H // HKV].repeat(HKV, 1, 1)  # peaked on kv head 0's keys
    emb = embeddings(4, 2048)
    served = []
    for kk, vv, kk2, vv2 in ((k0, v0, k20, v20), tuple(x.contiguous() for x in (k0, v0, k20, v20))):
        cache = AttentionEchoCache(config())
        miss, _ = cache.attention_with_echo(q, kk, vv, 2048, emb)
        hit, meta = cache.attention_with_echo(q2, kk2, vv2, 2048, emb)
        assert meta["tier"] == "sparse"
        served.append((miss, hit))
    assert torch.equal(served[0][0], served[1][0]) and torch.equal(served[0][1], served[1][1])


def host_copies(fn):
    """(direction, bytes) of every host<->device copy the GPU ran during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = "/tmp/attention_echo_cuda_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], e.get("args", {}).get("bytes", 0)) for e in events
            if e.get("cat") == "gpu_memcpy" and ("HtoD" in e["name"] or "DtoH" in e["name"])]


def test_no_host_round_trip_of_q_k_v():
    cache = AttentionEchoCache(config())
    q, k, v = qkv(4096, 2)
    q2, k2, v2 = qkv(4096, 2, noise=0.02)
    emb, tokens = embeddings(2, 4096), list(range(4096))
    cache.attention_with_echo(q, k, v, 4096, emb)  # warm-up: lazy CUDA setup is not the call's
    cache.clear()
    smallest = k.numel() * k.element_size()
    calls = {
        "miss": lambda: cache.attention_with_echo(q, k, v, 4096, emb, prefix_tokens=tokens),
        "exact hit": lambda: cache.attention_with_echo(q, k, v, 4096, emb, prefix_tokens=tokens),
        "sparse hit": lambda: cache.attention_with_echo(q2, k2, v2, 4096, emb),
    }
    assert any(size >= smallest for _, size in host_copies(lambda: k.cpu())), "the check sees a copy of k"
    for name, fn in calls.items():
        copies = host_copies(fn)
        assert all(size < smallest // 8 for _, size in copies), (name, copies)
    assert cache.stats["hits_exact"] == 1 and cache.stats["hits_sparse"] == 1


def test_bad_cuda_input_raises_naming_the_argument():
    cache = AttentionEchoCache(config())
    q, k, v = qkv(256, 3)
    with pytest.raises(ValueError, match="^query"):
        cache.attention_with_echo(q.float(), k.float(), v.float(), 128, embeddings(3, 128))
    with pytest.raises(ValueError, match="^key"):
        cache.attention_with_echo(q, k.half(), v, 128, embeddings(3, 128))
    with pytest.raises(ValueError, match="^key"):
        cache.attention_with_echo(q, k.cpu().float(), v, 128, embeddings(3, 128))
    with pytest.raises(ValueError, match="^mode"):
        AttentionEchoCache(config(mode="dense")).attention_with_echo(q, k, v, 128, embeddings(3, 128))
    assert cache.stats["total_lookups"] == 0 and len(cache) == 0


def test_torch_module_on_cuda_returns_cuda():
    from attention_echo.torch import EchoAttention

    attention = EchoAttention(hidden_dim=H * D, num_heads=H, config=config())
    x = torch.randn(2, 512, H * D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, meta = attention(x, x, x, prefix_length=256)
        again, meta2 = attention(x, x, x, prefix_length=256)
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == x.shape
    split = x.view(2, 512, H, D).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(split, split, split, is_causal=True).transpose(1, 2)
    assert rel(out, ref.reshape(2, 512, H * D)) < 1e-2
    assert meta2["echo_hit"]


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # head dim 64
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def test_hf_llama_bf16_matches_sdpa_and_hits_on_repeat(llama):
    import attention_echo.hf as echo_hf

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    llama.set_attn_implementation("sdpa")
    with torch.no_grad():
        sdpa_logits = llama(ids).logits
    echo_hf.enable(llama, config())
    with torch.no_grad(), echo_hf.echo_context(prefix_length=128):
        first = llama(ids).logits
        misses = echo_hf.last_meta(llama)
        second = llama(ids).logits
        hits = echo_hf.last_meta(llama)
    echo_hf.enable(llama, config(mode="off"))  # tokens only: the first call below stores exact rows
    with torch.no_grad():
        llama(ids, echo_prefix_tokens=ids[0, :128])
        exact = llama(ids, echo_prefix_tokens=ids[0, :128]).logits
    exact_meta = echo_hf.last_meta(llama)
    assert first.is_cuda
    assert all(not m["echo_hit"] for m in misses.values())
    scale = sdpa_logits.float().abs().max().item()
    assert (first.float() - sdpa_logits.float()).abs().max().item() < 2e-2 * scale
    assert all(m["echo_hit"] and m["tokens_echoed"] == 128 for m in hits.values())
    assert (second.float() - sdpa_logits.float()).abs().max().item() < 5e-2 * scale
    assert all(m["tier"] == "exact" for m in exact_meta.values())
    assert torch.equal(exact, first)


def test_hf_llama_bf16_padded_batch_is_served_per_sequence(llama):
    """Prompts of different lengths padded left and right (the mask generate()
    passes): each sequence reaches the cache on its own real tokens on the
    GPU, and the real positions match SDPA within bf16 tolerance."""
    import attention_echo.hf as echo_hf

    gen = torch.Generator().manual_seed(4)
    lengths = (200, 150, 96)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in lengths]
    for side in ("left", "right"):
        ids = torch.zeros(3, 200, dtype=torch.long)
        mask = torch.zeros(3, 200, dtype=torch.long)
        for b, p in enumerate(prompts):
            span = slice(200 - len(p), 200) if side == "left" else slice(0, len(p))
            ids[b, span], mask[b, span] = p, 1
        ids, mask = ids.cuda(), mask.cuda()
        llama.set_attn_implementation("sdpa")
        with torch.no_grad():
            want = llama(ids, attention_mask=mask).logits
        echo_hf.enable(llama, config())
        with torch.no_grad(), echo_hf.echo_context(prefix_length=64):
            got = llama(ids, attention_mask=mask).logits
        real = mask.bool()
        assert got.is_cuda, side
        scale = want[real].float().abs().max().item()
        assert (got[real].float() - want[real].float()).abs().max().item() < 2e-2 * scale, side
        metas = echo_hf.last_meta(llama)
        assert echo_hf.stats(llama)["total_lookups"] == 3 * 2, side  # 3 sequences x 2 layers
        assert all(not m["echo_hit"] for m in metas.values()), side
