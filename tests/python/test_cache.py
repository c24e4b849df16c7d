"""AttentionEchoCache: the seed's documented behaviour and ours."""

import math

import numpy as np
import pytest

from attention_echo import AttentionEchoCache, EchoConfig, attention, cosine_similarity, normalize


def test_first_call_misses_and_is_exact(make_qkv, make_emb, reference):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    out, meta = cache.attention_with_echo(query=q, key=k, value=v, prefix_length=64, prefix_embeddings=make_emb())
    assert meta["echo_hit"] is False
    assert meta["tokens_echoed"] == 0
    assert meta["tokens_computed"] == q.shape[1]
    assert meta["compute_mode"] == "full"
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)


def test_meta_has_the_seed_keys_and_ours(make_qkv, make_emb):
    q, k, v = make_qkv()
    _, meta = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb(), layer_id=3)
    assert set(meta) >= {"echo_hit", "similarity", "layer_id", "tokens_echoed", "tokens_computed",
                         "compute_mode", "tier", "estimated_error", "rejected", "kept_fraction"}
    assert meta["layer_id"] == 3


def test_similar_prefix_hits_with_similarity_above_threshold(make_qkv, make_emb, reference):
    cache = AttentionEchoCache(EchoConfig(similarity_threshold=0.85))
    q, k, v = make_qkv(0)
    emb = make_emb(1)
    cache.attention_with_echo(q, k, v, 64, emb)
    # A near-duplicate request: slightly different activations and embeddings.
    rng = np.random.default_rng(5)
    q2, k2, v2 = (x + 0.01 * rng.standard_normal(x.shape).astype(np.float32) for x in (q, k, v))
    emb2 = make_emb(2, like=emb, noise=0.05)
    assert cosine_similarity(cache.compute_semantic_key(emb), cache.compute_semantic_key(emb2)) > 0.85
    out, meta = cache.attention_with_echo(q2, k2, v2, 64, emb2)
    assert meta["echo_hit"] is True
    assert meta["similarity"] > 0.85
    assert meta["tokens_echoed"] == 64
    assert meta["tokens_computed"] == q.shape[1] - 64
    assert meta["compute_mode"] == "echo"
    assert meta["tier"] in ("sparse", "dense")
    assert meta["estimated_error"] <= cache.config.max_error
    ref = reference(q2, k2, v2)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= cache.config.max_error
    np.testing.assert_allclose(out[:, 64:], ref[:, 64:], atol=2e-5)  # suffix rows are always exact


def test_different_prefix_misses(make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv(0)
    cache.attention_with_echo(q, k, v, 64, make_emb(1))
    q2, k2, v2 = make_qkv(1)
    _, meta = cache.attention_with_echo(q2, k2, v2, 64, make_emb(2))
    assert meta["echo_hit"] is False
    assert meta["similarity"] < 0.85
    assert len(cache) == 2


def test_stats_count_hits_and_misses(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(capacity=10))
    q, k, v = make_qkv()
    emb = make_emb()
    for _ in range(3):
        cache.attention_with_echo(q, k, v, 64, emb)
    s = cache.stats
    assert {"hits", "misses", "total_lookups", "hit_rate", "cache_size", "capacity"} <= set(s)
    assert (s["hits"], s["misses"], s["total_lookups"]) == (2, 1, 3)
    assert s["hit_rate"] == pytest.approx(2 / 3)
    assert (s["cache_size"], s["capacity"]) == (1, 10)
    assert s["hits_sparse"] + s["hits_dense"] + s["hits_exact"] == 2
    assert s["tokens_echoed"] == 2 * 64


def test_eviction_at_capacity(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(capacity=2))
    q, k, v = make_qkv()
    for seed in range(3):
        cache.attention_with_echo(q, k, v, 64, make_emb(seed + 10))
    assert len(cache) == 2
    assert cache.stats["evictions"] == 1
    # LRU: the first prefix is gone, the last two are still served.
    assert cache.attention_with_echo(q, k, v, 64, make_emb(12))[1]["echo_hit"]
    assert not cache.attention_with_echo(q, k, v, 64, make_emb(10))[1]["echo_hit"]


def test_clear_drops_entries_and_stats(make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    cache.clear()
    assert len(cache) == 0
    assert cache.stats["total_lookups"] == 0 and cache.stats["cache_size"] == 0
    assert cache.attention_with_echo(q, k, v, 64, make_emb())[1]["echo_hit"] is False


def test_semantic_key_shape_unit_norm_and_deterministic(make_emb):
    cache = AttentionEchoCache(EchoConfig(hash_dim=96))
    emb = make_emb()
    key = cache.compute_semantic_key(emb)
    assert key.shape == (96,)
    assert np.linalg.norm(key) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(key, AttentionEchoCache(EchoConfig(hash_dim=96)).compute_semantic_key(emb))
    # float64 and 1-D embeddings are accepted too.
    np.testing.assert_allclose(cache.compute_semantic_key(emb.astype(np.float64)), key, atol=1e-6)
    np.testing.assert_allclose(cache.compute_semantic_key(emb.mean(axis=0)), key, atol=1e-5)


def test_repr_and_len(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(capacity=7))
    assert repr(cache) == "AttentionEchoCache(size=0/7, hit_rate=0.00%)"
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    cache.attention_with_echo(q, k, v, 64, make_emb())
    assert len(cache) == 1
    assert repr(cache) == "AttentionEchoCache(size=1/7, hit_rate=50.00%)"


def test_seed_positional_call_order(make_qkv, make_emb):
    # The seed's signature: (query, key, value, prefix_length, prefix_embeddings, layer_id, scale)
    q, k, v = make_qkv(H=1, Hkv=1)
    out, meta = AttentionEchoCache().attention_with_echo(q[0], k[0], v[0], 10, make_emb(P=10), 2, 0.25)
    assert out.shape == q[0].shape and meta["layer_id"] == 2


def test_prefix_length_longer_than_sequence_is_clipped_as_in_the_seed(make_qkv, make_emb):
    q, k, v = make_qkv(T=40)
    _, meta = AttentionEchoCache().attention_with_echo(q, k, v, 100, make_emb(P=40))
    assert meta["tokens_computed"] == 40


def test_exact_tier_with_prefix_tokens(make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    tokens = np.arange(64)
    out1, m1 = cache.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens)
    out2, m2 = cache.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=list(tokens))
    assert not m1["echo_hit"]
    assert m2["echo_hit"] and m2["tier"] == "exact" and m2["compute_mode"] == "exact"
    np.testing.assert_array_equal(out1, out2)
    # Same tokens in another namespace: never served across namespaces.
    _, m3 = cache.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens, namespace="tenant-b")
    assert not m3["echo_hit"]


def test_guard_rejects_a_bad_echo_and_computes_exactly(make_qkv, make_emb, reference):
    cache = AttentionEchoCache(EchoConfig(max_error=0.01, mode="dense"))
    emb = make_emb()
    q, k, v = make_qkv(0)
    cache.attention_with_echo(q, k, v, 64, emb)
    q2, k2, v2 = make_qkv(1)  # same semantic key, unrelated activations
    out, meta = cache.attention_with_echo(q2, k2, v2, 64, emb)
    assert meta["rejected"] is True and meta["echo_hit"] is False
    assert meta["estimated_error"] > 0.01
    np.testing.assert_allclose(out, reference(q2, k2, v2), atol=2e-5)
    assert cache.stats["rejected"] == 1


def test_guard_off_serves_any_similar_prefix_like_the_seed(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(max_error=math.inf, mode="dense"))
    emb = make_emb()
    q, k, v = make_qkv(0)
    cache.attention_with_echo(q, k, v, 64, emb)
    _, meta = cache.attention_with_echo(*make_qkv(1), 64, emb)
    assert meta["echo_hit"] and meta["tier"] == "dense"


def test_mode_exact_disables_semantic_hits(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(mode="exact"))
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    assert not cache.attention_with_echo(q, k, v, 64, make_emb())[1]["echo_hit"]


def test_save_and_load_round_trip(tmp_path, make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    tokens = np.arange(64)
    cache.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens)
    path = tmp_path / "cache.snap"
    cache.save(path)
    other = AttentionEchoCache()
    other.load(str(path))
    assert len(other) == 1
    _, meta = other.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens)
    assert meta["tier"] == "exact"


def test_loading_a_corrupt_snapshot_fails_and_keeps_the_cache(tmp_path, make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all" * 10)
    with pytest.raises(RuntimeError, match="corrupt"):
        cache.load(bad)
    with pytest.raises(FileNotFoundError):
        cache.load(tmp_path / "missing.snap")
    with pytest.raises(RuntimeError):
        cache.save(tmp_path / "no-such-dir" / "x.snap")
    assert len(cache) == 1
    assert cache.attention_with_echo(q, k, v, 64, make_emb())[1]["echo_hit"]


def test_plain_attention_matches_reference(make_qkv, reference):
    q, k, v = make_qkv()
    np.testing.assert_allclose(attention(q, k, v), reference(q, k, v), atol=2e-5)
    np.testing.assert_allclose(
        attention(q, k, v, causal=False, scale=0.1), reference(q, k, v, scale=0.1, causal=False), atol=2e-5
    )


def test_non_causal_attention_with_echo(make_qkv, make_emb, reference):
    q, k, v = make_qkv()
    out, _ = AttentionEchoCache().attention_with_echo(q, k, v, 64, make_emb(), causal=False)
    np.testing.assert_allclose(out, reference(q, k, v, causal=False, prefix_length=64), atol=2e-5)


def test_utils():
    assert cosine_similarity([1, 0], [0, 1]) == 0.0
    assert cosine_similarity([1, 2], [2, 4]) == pytest.approx(1.0)
    assert cosine_similarity([0, 0], [1, 1]) == 0.0
    n = normalize(np.array([3.0, 4.0]))
    np.testing.assert_allclose(n, [0.6, 0.8])
    np.testing.assert_array_equal(normalize(np.zeros(3)), np.zeros(3))


def test_seed_module_paths():
    from attention_echo.cache import AttentionEchoCache as C
    from attention_echo.config import EchoConfig as E
    from attention_echo.utils import mean_pool, softmax

    assert C is AttentionEchoCache and E is EchoConfig
    np.testing.assert_allclose(softmax(np.array([0.0, 0.0])), [0.5, 0.5])
    np.testing.assert_allclose(mean_pool(np.array([[1.0, 2.0], [3.0, 4.0]])), [2.0, 3.0])
