"""The C++ engine's logits against tools/llama_reference.py (PyTorch, float64).

Runs `aecho logits` on a fixed token sequence and compares every logit:
    max_i |engine_i - reference_i| / max(1, max_i |reference_i|) <= 1e-4
i.e. the largest absolute error relative to the largest logit magnitude of
the sequence (the logit scale), so the bound means the same for a model whose
logits span 5 and one whose logits span 50.

The aecho binary is $AECHO, else the first of build/release/aecho,
build-engine/aecho, build/aecho under the repository root.
"""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import llama_reference  # noqa: E402

TOLERANCE = 1e-4


def aecho_binary():
    candidates = [os.environ.get("AECHO", "")] + [
        os.path.join(ROOT, p, "aecho") for p in ("build/release", "build-engine", "build")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("no aecho binary built (set AECHO)")


def bundled_models():
    return sorted(p for p in glob.glob(os.path.join(ROOT, "models", "*", "*.bin"))
                  if not os.path.basename(p).startswith("tokenizer"))


def fixed_tokens(vocab, seq_len, count):
    rng = np.random.default_rng(1234)
    count = min(count, seq_len)
    return [1] + rng.integers(3, vocab, size=count - 1).tolist()


def relative_error(model, tmp_path, count):
    ckpt = llama_reference.load_checkpoint(model)
    tokens = fixed_tokens(ckpt.vocab, ckpt.seq_len, count)
    out = tmp_path / "logits.f32"
    subprocess.run([aecho_binary(), "logits", "--model", model, "--tokens", ",".join(map(str, tokens)),
                    "--out", str(out)], check=True)
    got = np.fromfile(out, dtype="<f4").reshape(len(tokens), ckpt.vocab)
    want = llama_reference.forward(ckpt, tokens).numpy()
    return np.abs(got - want).max() / max(1.0, np.abs(want).max())


def test_aidreams_logits_match_pytorch(tmp_path):
    model = os.path.join(SHARED, "data", "aidreams260K", "aidreams260K.bin")
    assert relative_error(model, tmp_path, 100) <= TOLERANCE


@pytest.mark.parametrize("model", bundled_models() or [None])
def test_bundled_model_logits_match_pytorch(model, tmp_path):
    if model is None:
        pytest.skip("no bundled model under models/")
    assert relative_error(model, tmp_path, 1024) <= TOLERANCE
