"""Quantized GGUF models and the tokenizer a GGUF file carries.

Most GGUF Llama models are published quantized (Q8_0, Q4_K_M, ...). The
engine dequantizes them at load; here every type it decodes is checked end
to end against gguf-py's own numpy dequantizer (llama.cpp's reference for
the layouts): the first two layers of the bundled model, every matrix
stored in one type, run by `aecho logits` and by tools/llama_reference.py
on gguf-py's dequantized weights. Types gguf-py can quantize are quantized
from the trained weights; the k-quants (which it only decodes) are random
codes with small scales, which exercises every bit field just as well.

Skipped where `gguf` (gguf-py) or torch is not installed.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from gguf import GGMLQuantizationType as Q, quants  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_engine_vs_torch import ROOT, SHARED, TOLERANCE, aecho_binary, llama_reference  # noqa: E402
import llama2c_to_gguf  # noqa: E402  (tools/, on the path through test_engine_vs_torch)

BUNDLED = os.path.join(ROOT, "models", "echo-llama-6m", "model.bin")  # every row a multiple of 256
AIDREAMS = os.path.join(SHARED, "data", "aidreams260K")
TOKENS = [1, 70, 100, 32, 115, 101, 108, 102, 46, 120, 13, 35, 200, 3, 258, 99, 44, 105, 110, 116]
LAYERS = 2
# Byte offsets of the f16 scales in each k-quant block (ggml-common.h),
# set to small values so that random codes make weights of a sane size.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_codes(rng):
    """An encoder for llama2c_to_gguf.write_gguf: k-quants as random codes
    (gguf-py decodes them, it cannot quantize them), the rest quantized."""
    def encode(matrix, qtype):
        if qtype not in K_SCALES:
            return llama2c_to_gguf.quantize(matrix, qtype)
        rows, cols = matrix.shape
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            scale = rng.uniform(2e-4, 1e-3, size=raw.shape[0]).astype(np.float16)
            raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(rows, -1)
        return raw, quants.dequantize(raw, qtype).reshape(matrix.shape)
    return encode


def aecho_logits(model, tmp_path, *args):
    out = tmp_path / "logits.f32"
    subprocess.run([aecho_binary(), "logits", "--model", str(model), "--out", str(out), *args], check=True)
    return np.fromfile(out, dtype="<f4")


@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_quantized_gguf_matches_its_dequantized_weights(qtype, tmp_path):
    c = llama_reference.load_checkpoint(BUNDLED, torch.float32)
    path = tmp_path / "model.gguf"
    ref = llama2c_to_gguf.write_gguf(path, c, qtype, layers=LAYERS, encode=random_codes(np.random.default_rng(qtype)))
    want = llama_reference.forward(ref, TOKENS).numpy()
    got = aecho_logits(path, tmp_path, "--tokens", ",".join(map(str, TOKENS))).reshape(want.shape)
    assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) <= TOLERANCE


def test_unsupported_type_is_refused_by_name(tmp_path):
    c = llama_reference.load_checkpoint(BUNDLED, torch.float32)
    path = tmp_path / "model.gguf"
    llama2c_to_gguf.write_gguf(path, c, Q.Q8_0, layers=LAYERS)
    data = bytearray(path.read_bytes())
    # Retype the first tensor (token_embd, Q8_0 = 8) as IQ4_NL (20): same
    # 32-value blocks, so only the type can be what is refused.
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    assert int.from_bytes(data[at:at + 4], "little") == int(Q.Q8_0)
    data[at:at + 4] = int(Q.IQ4_NL).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    run = subprocess.run([aecho_binary(), "logits", "--model", str(path), "--tokens", "1,2", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "token_embd.weight" in run.stderr and "IQ4_NL" in run.stderr, run.stderr


def test_gguf_vocabulary_encodes_like_its_tokenizer_bin(tmp_path):
    model, tokenizer = os.path.join(AIDREAMS, "aidreams260K.bin"), os.path.join(AIDREAMS, "tok512.bin")
    c = llama_reference.load_checkpoint(model, torch.float32)
    path = tmp_path / "model.gguf"
    llama2c_to_gguf.write_gguf(path, c, vocabulary=llama2c_to_gguf.vocabulary_of(tokenizer, c.vocab))
    prompt = "Echoes of vectors unfold, a gentle hum:\n\tprecision 42%"
    own = aecho_logits(path, tmp_path, "--prompt", prompt)
    given = aecho_logits(path, tmp_path, "--prompt", prompt, "--tokenizer", tokenizer)
    assert own.size > 20 * c.vocab  # the prompt's tokens, BOS first
    assert np.array_equal(own, given)


def test_unimplemented_gguf_tokenizer_is_named(tmp_path):
    c = llama_reference.load_checkpoint(os.path.join(AIDREAMS, "aidreams260K.bin"), torch.float32)
    path = tmp_path / "model.gguf"
    vocabulary = ([b"p%d" % i for i in range(c.vocab)], [0.0] * c.vocab, [1] * c.vocab)
    llama2c_to_gguf.write_gguf(path, c, vocabulary=vocabulary, tokenizer_model="t5")  # Unigram
    run = subprocess.run([aecho_binary(), "logits", "--model", str(path), "--prompt", "hi", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "'t5'" in run.stderr and "--tokenizer" in run.stderr, run.stderr
    # Token ids need no tokenizer: the model itself loads.
    assert aecho_logits(path, tmp_path, "--tokens", "1,5,9").size == 3 * c.vocab


def test_rope_frequency_factors_are_applied(tmp_path):
    """rope_freqs.weight (how llama.cpp stores Llama 3.1's RoPE scaling)
    divides RoPE's frequencies: the logits are the reference's with them,
    and far from its without them."""
    c = llama_reference.load_checkpoint(os.path.join(AIDREAMS, "aidreams260K.bin"), torch.float32)
    factors = np.random.default_rng(3).uniform(1.0, 8.0, c.head_dim // 2).astype(np.float32)
    path = tmp_path / "model.gguf"
    ref = llama2c_to_gguf.write_gguf(path, c, rope_factors=factors)
    tokens = [1] + [int(t) for t in np.random.default_rng(4).integers(3, c.vocab, 100)]
    want = llama_reference.forward(ref, tokens).numpy()
    got = aecho_logits(path, tmp_path, "--tokens", ",".join(map(str, tokens))).reshape(want.shape)
    scale = max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() / scale <= TOLERANCE
    del ref.rope_factors
    assert np.abs(got - llama_reference.forward(ref, tokens).numpy()).max() / scale > 100 * TOLERANCE


def test_rope_scaling_is_refused_not_ignored(tmp_path):
    c = llama_reference.load_checkpoint(os.path.join(AIDREAMS, "aidreams260K.bin"), torch.float32)
    path = tmp_path / "model.gguf"
    llama2c_to_gguf.write_gguf(path, c, metadata=[("llama.rope.scaling.type", "linear")])
    run = subprocess.run([aecho_binary(), "logits", "--model", str(path), "--tokens", "1,5", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "llama.rope.scaling.type 'linear'" in run.stderr, run.stderr
