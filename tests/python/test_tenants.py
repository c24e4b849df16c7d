"""Tenants from Python: per-namespace stats, clear of one namespace, and the
serving planner's clear; bad namespaces raise TypeError and change nothing."""

import os

import numpy as np
import pytest

from attention_echo import AttentionEchoCache, EchoConfig
from attention_echo.serving import LlamaServer

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "models", "echo-llama-6m", "model.bin")
COUNTERS = ["hits", "misses", "total_lookups", "cache_size", "bytes", "evictions", "hits_exact", "hits_sparse",
            "tokens_echoed", "tokens_computed", "oversize_skipped"]


def fill(cache, make_qkv, make_emb):
    for seed, namespace in [(0, "a"), (0, "a"), (1, "a"), (0, "b")]:
        q, k, v = make_qkv(seed)
        tokens = np.arange(64, dtype=np.int32) + 100 * seed
        cache.attention_with_echo(q, k, v, 64, make_emb(seed), prefix_tokens=tokens, namespace=namespace)


def test_namespace_stats_sum_to_the_cache_wide_stats(make_qkv, make_emb):
    cache = AttentionEchoCache()
    fill(cache, make_qkv, make_emb)
    assert cache.namespaces() == ["a", "b"]
    a, b, total = cache.namespace_stats("a"), cache.namespace_stats("b"), cache.stats
    assert (a["total_lookups"], a["hits"], a["cache_size"]) == (3, 1, 2)
    assert (b["total_lookups"], b["hits"], b["cache_size"]) == (1, 0, 1)  # a's entry is not b's
    for key in COUNTERS:
        assert a[key] + b[key] == total[key], key
    assert cache.namespace_stats("nobody")["total_lookups"] == 0


def test_clear_of_one_namespace_keeps_the_others(make_qkv, make_emb):
    cache = AttentionEchoCache()
    fill(cache, make_qkv, make_emb)
    b = cache.namespace_stats("b")
    cache.clear(namespace="a")
    assert len(cache) == 1 and cache.namespaces() == ["b"]
    assert cache.namespace_stats("a")["total_lookups"] == 0
    for key in COUNTERS:
        assert cache.stats[key] == b[key], key
    cache.clear()
    assert len(cache) == 0 and cache.namespaces() == []


def test_bad_namespace_raises_type_error_and_changes_nothing(make_qkv, make_emb):
    cache = AttentionEchoCache()
    fill(cache, make_qkv, make_emb)
    for bad in [1, b"a", ["a"]]:
        with pytest.raises(TypeError, match="namespace"):
            cache.clear(namespace=bad)
        with pytest.raises(TypeError, match="namespace"):
            cache.namespace_stats(bad)
    assert len(cache) == 3


def test_an_entry_over_max_bytes_is_counted_not_stored(make_qkv, make_emb):
    cache = AttentionEchoCache(EchoConfig(max_bytes=256))  # below the semantic key alone
    q, k, v = make_qkv()
    cache.attention_with_echo(q, k, v, 64, make_emb())
    assert cache.stats["oversize_skipped"] == 1 and len(cache) == 0


def test_planner_clear_drops_one_namespace():
    server = LlamaServer(MODEL, threads=1)
    prompt = [1] + list(range(40, 140))
    server.prefill(prompt, namespace="a")
    server.prefill(prompt, namespace="b")
    server.clear("a")
    assert server.stored_prompts == 1
    assert server.prefill(prompt, namespace="a")[1]["reused"] == 0
    assert server.prefill(prompt, namespace="b")[1]["reused"] == len(prompt) - 1
    with pytest.raises(TypeError, match="namespace"):
        server.clear(3)
