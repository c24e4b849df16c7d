"""Shapes, dtypes, strides and zero-copy passing of NumPy arrays."""

import numpy as np
import pytest

from attention_echo import AttentionEchoCache, _core


def test_single_head_2d(make_qkv, make_emb, reference):
    q, k, v = make_qkv(H=1, Hkv=1)
    out, meta = AttentionEchoCache().attention_with_echo(q[0], k[0], v[0], 64, make_emb())
    assert out.shape == q[0].shape
    np.testing.assert_allclose(out, reference(q[0], k[0], v[0]), atol=2e-5)


@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_multi_head_and_gqa(H, Hkv, make_qkv, make_emb, reference):
    q, k, v = make_qkv(H=H, Hkv=Hkv)
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb())
    assert out.shape == (H, 96, 32)
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)


def test_3d_query_with_2d_key_is_one_kv_head(make_qkv, make_emb, reference):
    q, k, v = make_qkv(H=4, Hkv=1)
    out, _ = AttentionEchoCache().attention_with_echo(q, k[0], v[0], 64, make_emb())
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)


def test_float64_in_float64_out(make_qkv, make_emb, reference):
    q, k, v = make_qkv(dtype=np.float64)
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb().astype(np.float64))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)


def test_float16_in_float16_out(make_qkv, make_emb):
    q, k, v = make_qkv(dtype=np.float16)
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb())
    assert out.dtype == np.float16


def test_strided_inputs_work(make_qkv, make_emb, reference):
    q, k, v = make_qkv(T=96)
    # Token-major buffers (T, H, D) viewed as (H, T, D): non-contiguous, unit last stride.
    qt = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2)
    kt = np.ascontiguousarray(k.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not qt.flags.c_contiguous
    # Every other element of a wider buffer: the last dimension is strided (copied).
    wide = np.repeat(v, 2, axis=2)
    vs = wide[:, :, ::2]
    assert vs.strides[-1] != 4
    out, _ = AttentionEchoCache().attention_with_echo(qt, kt, vs, 64, make_emb())
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)
    # Fortran order and negative strides.
    out2, _ = AttentionEchoCache().attention_with_echo(np.asfortranarray(q), k[::-1][::-1], v, 64, make_emb())
    np.testing.assert_allclose(out2, reference(q, k, v), atol=2e-5)


def test_read_only_inputs(make_qkv, make_emb):
    q, k, v = make_qkv()
    for x in (q, k, v):
        x.setflags(write=False)
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb())
    assert out.flags.writeable


def test_contiguous_float32_crosses_without_a_copy(make_qkv):
    q, _, _ = make_qkv()
    assert _core._data_address(q) == q.ctypes.data
    view = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2)  # strided, unit last stride
    assert _core._data_address(view) == view.ctypes.data


def test_output_is_a_fresh_array(make_qkv, make_emb):
    q, k, v = make_qkv()
    out1, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb())
    out2, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb())
    assert not np.shares_memory(out1, out2) and not np.shares_memory(out1, q)


def test_preallocated_out_is_written_in_place(make_qkv, make_emb, reference):
    q, k, v = make_qkv()
    buf = np.full(q.shape, np.nan, dtype=np.float32)
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb(), out=buf)
    assert out is buf
    np.testing.assert_allclose(buf, reference(q, k, v), atol=2e-5)


@pytest.mark.parametrize("bad, error", [
    (lambda q: np.empty(q.shape, np.float64), ValueError),
    (lambda q: np.empty(q.shape[1:], np.float32), ValueError),
    (lambda q: np.empty(q.shape[::-1], np.float32).T, ValueError),
    (lambda q: [0.0], TypeError),
])
def test_bad_out_is_rejected_and_cache_unchanged(make_qkv, make_emb, bad, error):
    q, k, v = make_qkv()
    cache = AttentionEchoCache()
    with pytest.raises(error, match="out"):
        cache.attention_with_echo(q, k, v, 64, make_emb(), out=bad(q))
    assert len(cache) == 0 and cache.stats["total_lookups"] == 0


def test_scale_argument(make_qkv, make_emb, reference):
    q, k, v = make_qkv()
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb(), scale=0.05)
    np.testing.assert_allclose(out, reference(q, k, v, scale=0.05), atol=2e-5)


def test_prefix_length_zero_needs_no_embeddings(make_qkv, reference):
    q, k, v = make_qkv()
    cache = AttentionEchoCache()
    out, meta = cache.attention_with_echo(q, k, v)
    assert meta["echo_hit"] is False and meta["tokens_computed"] == 96
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)
