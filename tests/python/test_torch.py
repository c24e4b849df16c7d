"""attention_echo.torch: the seed's modules over the C++ core."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from attention_echo import EchoConfig  # noqa: E402
from attention_echo.torch import EchoAttention, EchoMultiHeadAttention, echo_attention  # noqa: E402


def sdpa_heads(q, k, v, num_heads, causal=True):
    """Reference: (B, T, hidden) inputs split into heads, torch SDPA, merged back."""
    B, T, hidden = q.shape
    hd = hidden // num_heads
    split = lambda x: x.view(B, x.shape[1], -1, hd).transpose(1, 2)
    qh, kh, vh = split(q), split(k), split(v)
    if kh.shape[1] != qh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    return out.transpose(1, 2).reshape(B, T, hidden)


def test_page_example_constructor_and_call():
    torch.manual_seed(0)
    attention = EchoAttention(hidden_dim=768, num_heads=12, cache_capacity=1000)
    q, k, v = (torch.randn(1, 80, 768) for _ in range(3))
    with torch.no_grad():
        output, meta = attention(query=q, key=k, value=v, prefix_length=64)
        output2, meta2 = attention(query=q, key=k, value=v, prefix_length=64)
    assert output.shape == q.shape and output.dtype == torch.float32
    assert meta["echo_hit"] is False and meta2["echo_hit"] is True
    torch.testing.assert_close(output, sdpa_heads(q, k, v, 12), atol=2e-5, rtol=1e-4)
    stats = attention.cache.stats
    assert (stats["hits"], stats["misses"], stats["capacity"]) == (1, 1, 1000)
    assert stats["hit_rate"] == 0.5


def test_seed_constructor_signature_single_head():
    cfg = EchoConfig(capacity=5)
    attention = EchoAttention(64, cfg, 3)  # (hidden_dim, config, layer_id)
    assert attention.num_heads == 1 and attention.scale == 64**-0.5
    assert attention.cache.config.capacity == 5 and attention.layer_id == 3
    q, k, v = (torch.randn(2, 40, 64) for _ in range(3))
    with torch.no_grad():
        out, meta = attention(q, k, v, prefix_length=16)
    torch.testing.assert_close(out, sdpa_heads(q, k, v, 1), atol=2e-5, rtol=1e-4)
    assert meta["echo_hit"] is False and len(meta["per_sequence"]) == 2
    assert meta["per_sequence"][0]["layer_id"] == 3


def test_two_dim_inputs_and_gqa():
    attention = EchoAttention(hidden_dim=64, num_heads=4)
    q = torch.randn(48, 64)
    k, v = torch.randn(48, 32), torch.randn(48, 32)  # 2 kv heads
    with torch.no_grad():
        out, _ = attention(q, k, v, prefix_length=16)
    assert out.shape == (48, 64)
    torch.testing.assert_close(out, sdpa_heads(q[None], k[None], v[None], 4)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_keeps_the_input_dtype(dtype):
    attention = EchoAttention(hidden_dim=32, num_heads=2)
    q, k, v = (torch.randn(1, 24, 32, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        out, _ = attention(q, k, v, prefix_length=8)
    assert out.dtype == dtype
    ref = sdpa_heads(q.float(), k.float(), v.float(), 2)
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 2e-5, rtol=1e-2)


def test_grad_warning_once_and_no_warning_under_no_grad():
    attention = EchoAttention(hidden_dim=32, num_heads=2)
    q = torch.randn(1, 16, 32, requires_grad=True)
    k, v = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    with pytest.warns(UserWarning, match="inference-only"):
        out, _ = attention(q, k, v, prefix_length=8)
    assert not out.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, prefix_length=8)  # once only
        with torch.no_grad():
            EchoAttention(hidden_dim=32, num_heads=2)(q, k, v, prefix_length=8)


def test_attn_mask_uses_the_standard_path():
    attention = EchoAttention(hidden_dim=32, num_heads=2)
    q, k, v = (torch.randn(1, 16, 32) for _ in range(3))
    mask = torch.zeros(16, 16)
    with torch.no_grad():
        out, meta = attention(q, k, v, prefix_length=8, attn_mask=mask)
    assert meta["compute_mode"] == "standard" and len(attention.cache) == 0
    torch.testing.assert_close(out, sdpa_heads(q, k, v, 2, causal=False), atol=2e-5, rtol=1e-4)


def test_multi_head_attention_module():
    torch.manual_seed(0)
    mha = EchoMultiHeadAttention(hidden_dim=64, num_heads=4, cache_capacity=50).eval()
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        out, meta = mha(x, prefix_length=32)
        out2, meta2 = mha(x, prefix_length=32)
        ref, ref_meta = mha(x, prefix_length=32, use_echo=False)
    assert out.shape == x.shape
    assert meta["echo_hit"] is False and meta2["echo_hit"] is True
    assert ref_meta["compute_mode"] == "standard"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out2, ref, atol=1e-2, rtol=1e-2)
    s = mha.get_stats()
    assert {"hits", "misses", "total_lookups", "hit_rate", "ops_saved", "num_heads"} <= set(s)
    assert (s["hits"], s["misses"], s["num_heads"]) == (1, 1, 4)
    assert mha.cache is mha.cache and mha.cache.config.capacity == 50
    mha.clear_cache()
    assert len(mha.cache) == 0


def test_multi_head_seed_positional_constructor_and_grad_warning():
    mha = EchoMultiHeadAttention(32, 4, EchoConfig(capacity=3), 2, 0.0, False)
    assert mha.q_proj.bias is None and mha.layer_id == 2
    x = torch.randn(1, 12, 32)
    with pytest.warns(UserWarning, match="inference-only"):
        mha(x, prefix_length=4)


def test_echo_attention_writes_strided_float32_views_without_copies():
    # (B, T, H*D) projections viewed as (B, H, T, D): passed as they are.
    B, T, H, D = 2, 32, 4, 16
    proj = torch.randn(B, T, H * D)
    q = proj.view(B, T, H, D).transpose(1, 2)
    out = torch.empty(B, T, H, D)
    from attention_echo import AttentionEchoCache, _core

    assert _core._data_address(q[0]) == q[0].data_ptr()
    result, _ = echo_attention(AttentionEchoCache(), q, q, q, 0, out=out)
    assert result is out
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_non_contiguous_query():
    attention = EchoAttention(hidden_dim=32, num_heads=2)
    base = torch.randn(1, 32, 24)
    q = base.transpose(1, 2)  # (1, 24, 32), non-contiguous
    k, v = torch.randn(1, 24, 32), torch.randn(1, 24, 32)
    with torch.no_grad():
        out, _ = attention(q, k, v, prefix_length=8)
    torch.testing.assert_close(out, sdpa_heads(q.contiguous(), k, v, 2), atol=2e-5, rtol=1e-4)


def test_inference_mode_tensors():
    attention = EchoAttention(hidden_dim=64, num_heads=4)
    with torch.inference_mode():
        q = torch.randn(2, 40, 64)
        out, meta = attention(q, q, q, prefix_length=16)
        _, meta2 = attention(q, q, q, prefix_length=16)
    assert out.shape == q.shape and not meta["echo_hit"] and meta2["echo_hit"]


def test_batched_prefix_arguments_must_have_one_entry_per_sequence():
    attention = EchoAttention(hidden_dim=32, num_heads=2)
    q = torch.randn(2, 16, 32)
    with torch.no_grad():
        _, meta = attention(q, q, q, prefix_length=8, prefix_embeddings=torch.randn(2, 8, 5),
                            prefix_tokens=[[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
        assert len(meta["per_sequence"]) == 2
        for kwargs in ({"prefix_embeddings": torch.randn(3, 8, 5)}, {"prefix_tokens": np.zeros((1, 8), np.int64)}):
            with pytest.raises(ValueError, match="^prefix_(embeddings|tokens) must have one entry per sequence"):
                attention(q, q, q, prefix_length=8, **kwargs)
    assert len(attention.cache) == 2
