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

BUNDLED = os.path.join(ROOT, "models", "echo-llama-6m", "model.bin")  # every row a multiple of 256
AIDREAMS = os.path.join(SHARED, "data", "aidreams260K")
TOKENS = [1, 70, 100, 32, 115, 101, 108, 102, 46, 120, 13, 35, 200, 3, 258, 99, 44, 105, 110, 116]
LAYERS = 2
# Byte offsets of the f16 scales in each k-quant block (ggml-common.h),
# set to small values so that random codes make weights of a sane size.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def encode(matrix, qtype, rng):
    """(bytes as gguf-py's writer takes them, what they decode to)."""
    if qtype in K_SCALES:
        rows, cols = matrix.shape
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            scale = rng.uniform(2e-4, 1e-3, size=raw.shape[0]).astype(np.float16)
            raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = quants.quantize(matrix.astype(np.float32), qtype)
    return raw, quants.dequantize(raw, qtype).reshape(matrix.shape)


def write_model(path, c, qtype, rng):
    """The first LAYERS layers of checkpoint c, matrices in qtype; returns
    a llama_reference checkpoint holding what they decode to."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    ref = llama_reference.Checkpoint()
    for key in ("dim", "hidden", "n_heads", "n_kv_heads", "vocab", "seq_len", "head_dim", "shared"):
        setattr(ref, key, getattr(c, key))
    ref.n_layers, ref.dtype = LAYERS, torch.float64

    def matrix(name, t):
        raw, decoded = encode(t.numpy(), qtype, rng)
        w.add_tensor(name, raw, raw_dtype=qtype)
        return torch.from_numpy(decoded.astype(np.float64))

    def vector(name, t):  # norms stay F32, as llama.cpp's quantizer keeps them
        w.add_tensor(name, t.numpy().astype(np.float32))
        return t.to(torch.float64)

    ref.tok = matrix("token_embd.weight", c.tok)
    per_layer = {key: [] for key in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w3", "w2")}
    for l in range(LAYERS):
        b = "blk.%d." % l
        per_layer["rms_att"].append(vector(b + "attn_norm.weight", c.rms_att[l]))
        per_layer["wq"].append(matrix(b + "attn_q.weight", c.wq[l]))
        per_layer["wk"].append(matrix(b + "attn_k.weight", c.wk[l]))
        per_layer["wv"].append(matrix(b + "attn_v.weight", c.wv[l]))
        per_layer["wo"].append(matrix(b + "attn_output.weight", c.wo[l]))
        per_layer["rms_ffn"].append(vector(b + "ffn_norm.weight", c.rms_ffn[l]))
        per_layer["w1"].append(matrix(b + "ffn_gate.weight", c.w1[l]))
        per_layer["w3"].append(matrix(b + "ffn_up.weight", c.w3[l]))
        per_layer["w2"].append(matrix(b + "ffn_down.weight", c.w2[l]))
    for key, tensors in per_layer.items():
        setattr(ref, key, torch.stack(tensors))
    ref.rms_final = vector("output_norm.weight", c.rms_final)
    ref.wcls = ref.tok  # the bundled model ties its classifier to the embedding
    finish(w)
    return ref


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def aecho_logits(model, tmp_path, *args):
    out = tmp_path / "logits.f32"
    subprocess.run([aecho_binary(), "logits", "--model", str(model), "--out", str(out), *args], check=True)
    return np.fromfile(out, dtype="<f4")


@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_quantized_gguf_matches_its_dequantized_weights(qtype, tmp_path):
    c = llama_reference.load_checkpoint(BUNDLED, torch.float32)
    assert c.shared
    path = tmp_path / "model.gguf"
    ref = write_model(path, c, qtype, np.random.default_rng(int(qtype)))
    want = llama_reference.forward(ref, TOKENS).numpy()
    got = aecho_logits(path, tmp_path, "--tokens", ",".join(map(str, TOKENS))).reshape(want.shape)
    assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) <= TOLERANCE


def test_unsupported_type_is_refused_by_name(tmp_path):
    c = llama_reference.load_checkpoint(BUNDLED, torch.float32)
    path = tmp_path / "model.gguf"
    write_model(path, c, Q.Q8_0, np.random.default_rng(0))
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


def write_with_vocabulary(path, c, pieces, scores, model="llama", types=None):
    """Checkpoint c in F32 with a tokenizer.ggml vocabulary, pieces spelling
    spaces as SentencePiece does (U+2581)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    w.add_token_list([p.replace(b" ", "\u2581".encode()) for p in pieces])
    w.add_token_scores(scores)
    if types is not None:
        w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", c.tok.numpy())
    for l in range(c.n_layers):
        b = "blk.%d." % l
        for name, t in (("attn_norm", c.rms_att), ("attn_q", c.wq), ("attn_k", c.wk), ("attn_v", c.wv),
                        ("attn_output", c.wo), ("ffn_norm", c.rms_ffn), ("ffn_gate", c.w1), ("ffn_up", c.w3),
                        ("ffn_down", c.w2)):
            w.add_tensor(b + name + ".weight", t[l].numpy())
    w.add_tensor("output_norm.weight", c.rms_final.numpy())
    if not c.shared:
        w.add_tensor("output.weight", c.wcls.numpy())
    finish(w)


def test_gguf_vocabulary_encodes_like_its_tokenizer_bin(tmp_path):
    model, tokenizer = os.path.join(AIDREAMS, "aidreams260K.bin"), os.path.join(AIDREAMS, "tok512.bin")
    c = llama_reference.load_checkpoint(model, torch.float32)
    pieces, scores, _ = llama_reference.load_tokenizer(tokenizer, c.vocab)
    # llama.cpp's token types: unknown, control (BOS, EOS), byte, normal.
    types = [2, 3, 3] + [6 if p.startswith(b"<0x") else 1 for p in pieces[3:]]
    path = tmp_path / "model.gguf"
    write_with_vocabulary(path, c, pieces, scores, types=types)
    prompt = "Echoes of vectors unfold, a gentle hum:\n\tprecision 42%"
    own = aecho_logits(path, tmp_path, "--prompt", prompt)
    given = aecho_logits(path, tmp_path, "--prompt", prompt, "--tokenizer", tokenizer)
    assert own.size > 20 * c.vocab  # the prompt's tokens, BOS first
    assert np.array_equal(own, given)


def test_unimplemented_gguf_tokenizer_is_named(tmp_path):
    c = llama_reference.load_checkpoint(os.path.join(AIDREAMS, "aidreams260K.bin"), torch.float32)
    path = tmp_path / "model.gguf"
    write_with_vocabulary(path, c, [b"p%d" % i for i in range(c.vocab)], [0.0] * c.vocab, model="gpt2")
    run = subprocess.run([aecho_binary(), "logits", "--model", str(path), "--prompt", "hi", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "'gpt2'" in run.stderr and "--tokenizer" in run.stderr, run.stderr
    # Token ids need no tokenizer: the model itself loads.
    assert aecho_logits(path, tmp_path, "--tokens", "1,5,9").size == 3 * c.vocab
