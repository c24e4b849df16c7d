"""Bad input raises ValueError/TypeError naming the argument; the cache is unchanged."""

import numpy as np
import pytest

from attention_echo import AttentionEchoCache


@pytest.fixture
def warm(make_qkv, make_emb):
    """A cache with one entry and one lookup, plus a valid request."""
    cache = AttentionEchoCache()
    q, k, v = make_qkv()
    emb = make_emb()
    cache.attention_with_echo(q, k, v, 64, emb)
    return cache, dict(query=q, key=k, value=v, prefix_length=64, prefix_embeddings=emb)


def _state(cache):
    return len(cache), cache.stats


def _call_fails(cache, request, error, name, **changes):
    before = _state(cache)
    with pytest.raises(error) as err:
        cache.attention_with_echo(**{**request, **changes})
    assert name in str(err.value), str(err.value)
    assert _state(cache) == before
    return str(err.value)


nan_q = lambda q: np.where(np.arange(q.size).reshape(q.shape) == 7, np.nan, q).astype(q.dtype)


@pytest.mark.parametrize(
    "arg, make_bad, error",
    [
        ("query", lambda r: r["query"][0, 0], ValueError),  # ndim 1
        ("query", lambda r: r["query"][None], ValueError),  # ndim 4
        ("key", lambda r: r["key"][:, :50], ValueError),  # T mismatch
        ("key", lambda r: r["key"][:, :, :16], ValueError),  # D mismatch
        ("key", lambda r: np.concatenate([r["key"]] * 3)[:3], ValueError),  # 3 kv heads for 4 heads
        ("value", lambda r: r["value"][:1], ValueError),  # value heads != key heads
        ("query", lambda r: r["query"].astype(np.int32), TypeError),
        ("key", lambda r: r["key"].astype(np.complex64), TypeError),
        ("query", lambda r: r["query"].tolist(), TypeError),
        ("value", lambda r: None, TypeError),
        ("key", lambda r: "keys", TypeError),
        ("query", lambda r: nan_q(r["query"]), ValueError),
        ("value", lambda r: np.full_like(r["value"], np.inf), ValueError),
        ("prefix_embeddings", lambda r: np.full_like(r["prefix_embeddings"], np.nan), ValueError),
        ("prefix_embeddings", lambda r: r["prefix_embeddings"][None], ValueError),
        ("prefix_embeddings", lambda r: [[1.0, 2.0]], TypeError),
        ("prefix_embeddings", lambda r: r["prefix_embeddings"].astype(np.int64), TypeError),
        ("prefix_length", lambda r: -1, ValueError),
        ("prefix_length", lambda r: 3.5, TypeError),
        ("prefix_length", lambda r: "10", TypeError),
        ("layer_id", lambda r: None, TypeError),
        ("prefix_tokens", lambda r: ["a", "b"], TypeError),
        ("prefix_tokens", lambda r: np.array([1.5, 2.5]), TypeError),
        ("prefix_tokens", lambda r: np.array([[1, 2]]), ValueError),
        ("prefix_tokens", lambda r: np.array([2**40]), ValueError),
        ("namespace", lambda r: 5, TypeError),
        ("scale", lambda r: -1.0, ValueError),
        ("scale", lambda r: float("nan"), ValueError),
        ("scale", lambda r: "big", TypeError),
    ],
)
def test_bad_argument(warm, arg, make_bad, error):
    cache, request = warm
    _call_fails(cache, request, error, arg, **{arg: make_bad(request)})


def test_missing_embeddings_with_a_prefix_is_a_value_error(warm):
    cache, request = warm
    _call_fails(cache, request, ValueError, "prefix_embeddings", prefix_embeddings=None)


def test_torch_and_numpy_errors_match(warm):
    torch = pytest.importorskip("torch")
    cache, request = warm
    _call_fails(cache, request, ValueError, "query", query=torch.from_numpy(nan_q(request["query"])))
    _call_fails(cache, request, TypeError, "key", key=torch.from_numpy(request["key"]).to(torch.int32))


def test_semantic_key_errors_name_the_argument():
    cache = AttentionEchoCache()
    for bad, error in [(np.zeros((0, 4), np.float32), ValueError), (np.full((2, 4), np.nan), ValueError),
                       ("x", TypeError), (np.zeros((2, 2, 2)), ValueError)]:
        with pytest.raises(error) as err:
            cache.compute_semantic_key(bad)
        assert "embeddings" in str(err.value)


def test_error_messages_are_clear(warm):
    cache, request = warm
    msg = _call_fails(cache, request, ValueError, "key", key=request["key"][:, :50])
    assert msg.startswith("key")
    msg = _call_fails(cache, request, TypeError, "query", query=[1, 2, 3])
    assert "numpy.ndarray or torch.Tensor" in msg
