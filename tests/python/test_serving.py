"""The serving planner from Python on the bundled model: prefill, reuse
report, exact skip of a repeated prompt, blending of a near-duplicate,
namespaces, bad input."""

import os

import numpy as np
import pytest

from attention_echo.serving import LlamaServer

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "models", "echo-llama-6m", "model.bin")


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(3)
    text = open(os.path.join(os.path.dirname(MODEL), "heldout.txt"), "rb").read()
    start = int(rng.integers(0, len(text) - 4000))
    return [1] + [b + 3 for b in text[start:start + 1500]]  # BOS, then byte tokens


def test_repeat_skips_and_near_duplicate_blends(prompt):
    server = LlamaServer(MODEL, threads=2)
    plain = LlamaServer(MODEL, threads=2, blend=False)
    first, report = server.prefill(prompt)
    assert first.shape == (server.vocab_size,) and first.dtype == np.float32
    assert report["route"] == "reuse" and report["reused"] == 0
    again, report = server.prefill(prompt)
    assert report["reused"] == len(prompt) - 1 and report["reused_exact"]
    np.testing.assert_allclose(again, first, atol=1e-4)

    near = list(prompt)
    near[30] = 3 + (near[30] - 3 + 1) % 256  # one byte changed early
    logits, report = server.prefill(near)
    exact, _ = plain.prefill(near)
    assert report["route"] == "blend"
    assert report["blend_reused_rows"] > len(prompt) // 2
    assert 0 <= report["estimated_error"] <= report["guard_estimate_bound"] <= 0.2
    assert 0 < report["blend_deviation"] <= report["guard_deviation_bound"] <= 0.2
    assert report["blend_refused_at_layer"] == -1
    assert not report["blend_screened"]  # tried, not screened
    assert int(np.argmax(logits)) == int(np.argmax(exact))


@pytest.mark.parametrize("selection", ["run-start", "deviation"])
def test_blend_selection(prompt, selection):
    """An early edit blends either way; only the deviation ranking runs
    layer 0 over every row past the stored prefix."""
    server = LlamaServer(MODEL, threads=2, blend_selection=selection)
    server.prefill(prompt)
    near = list(prompt)
    near[30] = 3 + (near[30] - 3 + 1) % 256
    _, report = server.prefill(near)
    assert report["route"] == "blend" and not report["blend_rejected"]
    computed = len(near) - report["reused"]
    assert report["blend_first_layer_rows"] == (computed if selection == "deviation" else 0)


def test_calibration_before_serving(prompt):
    server = LlamaServer(MODEL, threads=2)
    passages = [prompt[:40], prompt[40:300], prompt[300:560], prompt[560:820]]
    samples = server.calibrate(passages)
    assert len(samples) == 3
    assert all(s["estimate"] > 0 and s["kl"] >= 0 for s in samples)
    assert all(s["deviation"] > 0 and s["continuation_kl"] >= 0 for s in samples)
    # moved passages, an edit, an insertion: pooled by the rows they recompute
    assert [s["selection"] for s in samples] == ["deviation", "run-start", "run-start"]
    assert server.stored_prompts == 0
    with pytest.raises(ValueError, match="passages"):
        server.calibrate(passages[:2])
    with pytest.raises(ValueError, match="passages"):
        server.calibrate([[1, 2], [3, 4], [server.vocab_size] * 300])
    with pytest.raises(TypeError, match="passages"):
        server.calibrate("not tokens")


def test_namespaces_do_not_share(prompt):
    server = LlamaServer(MODEL, threads=2)
    server.prefill(prompt, namespace="a")
    _, report = server.prefill(prompt, namespace="b")
    assert report["reused"] == 0 and report["route"] == "reuse"


def test_reserved_store_serves_the_same(prompt):
    plain = LlamaServer(MODEL, threads=1)
    reserved = LlamaServer(MODEL, threads=1, store_bytes=64 << 20, reserve_bytes=16 << 20)
    for server in (plain, reserved):
        server.prefill(prompt)
    np.testing.assert_array_equal(reserved.prefill(prompt)[0], plain.prefill(prompt)[0])


def test_bad_input_raises_and_stores_nothing():
    server = LlamaServer(MODEL, threads=1)
    with pytest.raises(ValueError, match="tokens"):
        server.prefill([1, 2, server.vocab_size])
    with pytest.raises(ValueError, match="tokens"):
        server.prefill([])
    with pytest.raises(ValueError, match="tokens"):
        server.prefill([5] * (server.context_length + 1))
    with pytest.raises(TypeError, match="tokens"):
        server.prefill([1.5, 2.0])
    with pytest.raises(TypeError, match="namespace"):
        server.prefill([1, 2], namespace=3)
    with pytest.raises(ValueError, match="recompute_ratio"):
        LlamaServer(MODEL, recompute_ratio=2.0)
    with pytest.raises(ValueError, match="blend_selection"):
        LlamaServer(MODEL, blend_selection="hkvd")
    with pytest.raises(TypeError, match="blend_selection"):
        LlamaServer(MODEL, blend_selection=1)
    with pytest.raises(ValueError, match="reserve_bytes"):
        LlamaServer(MODEL, store_bytes=1 << 20, reserve_bytes=2 << 20)
    with pytest.raises(ValueError, match="reserve_bytes"):
        LlamaServer(MODEL, reserve_bytes=-1)
    with pytest.raises(ValueError, match="^store_url"):
        LlamaServer(MODEL, store_url="http://127.0.0.1:6379")
    with pytest.raises(TypeError, match="store_url"):
        LlamaServer(MODEL, store_url=6379)
    with pytest.raises((ValueError, RuntimeError), match="nope"):
        LlamaServer("/nope/model.bin")
    assert server.stored_prompts == 0


def test_text_through_the_models_own_tokenizer(tmp_path):
    server = LlamaServer(MODEL, threads=2)
    text = "def f(x):\n    return x  # naïve ✓"
    ids = server.tokenize(text)
    assert ids.dtype == np.int32
    # The bundled vocabulary is bytes (id 3 + b) after BOS.
    assert ids.tolist() == [1] + [b + 3 for b in text.encode()]
    assert server.decode(ids) == text
    logits, report = server.prefill(ids)
    assert logits.shape == (server.vocab_size,) and report["reused"] == 0
    with pytest.raises(TypeError, match="text"):
        server.tokenize(b"bytes")
    with pytest.raises(ValueError, match="out of range"):
        server.decode([server.vocab_size])
    # A checkpoint without a tokenizer beside it serves token ids; text is refused, saying why.
    alone = tmp_path / "model.bin"
    alone.write_bytes(open(MODEL, "rb").read())
    bare = LlamaServer(str(alone), threads=1)
    assert bare.prefill(ids)[0].shape == (bare.vocab_size,)
    with pytest.raises(ValueError, match="no tokenizer.*tokenizer.bin"):
        bare.tokenize(text)


def test_replicas_share_exact_blocks_through_redis(prompt, redis_url):
    """A second server of the same model reads the K/V blocks the first
    computed from the shared store and serves the same logits."""
    try:
        first = LlamaServer(MODEL, threads=2, store_url=redis_url)
    except RuntimeError as e:  # a build without Redis (AE_REDIS=OFF)
        pytest.skip(str(e))
    logits, report = first.prefill(prompt)
    blocks = len(prompt) // 64  # full blocks of the store's 64 tokens
    assert report["reused_from_l2"] == 0 and first.l2_stats["writes"] == blocks
    second = LlamaServer(MODEL, threads=2, store_url=redis_url)
    again, report = second.prefill(prompt)
    assert report["reused"] == report["reused_from_l2"] == blocks * 64 and report["reused_exact"]
    assert second.l2_stats["hits"] == blocks and second.l2_stats["rejected"] == 0
    np.testing.assert_allclose(again, logits, atol=1e-4)
