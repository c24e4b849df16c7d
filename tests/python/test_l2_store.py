"""The shared L2 store from Python: EchoConfig.store_url, AttentionEchoCache.l2_stats,
on a real redis-server (conftest.py's redis_url)."""

import numpy as np
import pytest

from attention_echo import AttentionEchoCache, EchoConfig


def test_a_second_cache_is_served_what_the_first_computed(make_qkv, make_emb, redis_url):
    q, k, v = make_qkv()
    tokens = np.arange(64, dtype=np.int32)
    try:
        first = AttentionEchoCache(EchoConfig(store_url=redis_url))
    except RuntimeError as e:  # a build without Redis (AE_REDIS=OFF)
        pytest.skip(str(e))
    out_a, meta_a = first.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens)
    assert meta_a["tier"] == "none"
    assert first.l2_stats["writes"] == 1

    second = AttentionEchoCache(EchoConfig(store_url=redis_url))
    out_b, meta_b = second.attention_with_echo(q, k, v, 64, make_emb(), prefix_tokens=tokens)
    assert meta_b["tier"] == "exact"
    assert second.l2_stats["hits"] == 1
    assert second.l2_stats["max_lookup_seconds"] > 0
    np.testing.assert_array_equal(out_b, out_a)


def test_a_bad_store_url_names_the_field():
    with pytest.raises(ValueError, match="^store_url"):
        EchoConfig(store_url="http://127.0.0.1:6379")
    with pytest.raises(TypeError, match="store_url"):
        EchoConfig(store_url=6379)


def test_no_store_counts_nothing(make_qkv, make_emb):
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    assert cache.l2_stats["lookups"] == 0 and cache.l2_stats["writes"] == 0
