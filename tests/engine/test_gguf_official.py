"""GGUF files written by the official `gguf` package (llama.cpp's gguf-py) load
in the engine and give the logits of the llama2.c checkpoint they came from:
bit-identical for F32 tensors, within F16 rounding for F16 ones.

Skipped where `gguf` is not installed. The C++ suite has its own GGUF writer
(tests/test_engine.cpp); this test checks the reader against the reference
writer's layout (alignment, metadata types, dimension order).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_engine_vs_torch import SHARED, aecho_binary, llama_reference  # noqa: E402

MODEL = os.path.join(SHARED, "data", "aidreams260K", "aidreams260K.bin")
TOKENS = "1,34,300,5,77,411,13,256,2,99,140,7,450,61,3,222"


def write_gguf(path, c, dtype):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    def matrix(name, t):  # [out, in]: gguf-py writes ne = (in, out)
        w.add_tensor(name, t.numpy().astype(dtype))

    def vector(name, t):  # norms stay F32, as llama.cpp's converter keeps them
        w.add_tensor(name, t.numpy().astype(np.float32))

    matrix("token_embd.weight", c.tok)
    for l in range(c.n_layers):
        b = "blk.%d." % l
        vector(b + "attn_norm.weight", c.rms_att[l])
        matrix(b + "attn_q.weight", c.wq[l])
        matrix(b + "attn_k.weight", c.wk[l])
        matrix(b + "attn_v.weight", c.wv[l])
        matrix(b + "attn_output.weight", c.wo[l])
        vector(b + "ffn_norm.weight", c.rms_ffn[l])
        matrix(b + "ffn_gate.weight", c.w1[l])
        matrix(b + "ffn_down.weight", c.w2[l])
        matrix(b + "ffn_up.weight", c.w3[l])
    vector("output_norm.weight", c.rms_final)
    if not c.shared:
        matrix("output.weight", c.wcls)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits(model, tmp_path, vocab):
    out = tmp_path / "logits.f32"
    subprocess.run([aecho_binary(), "logits", "--model", str(model), "--tokens", TOKENS, "--out", str(out)],
                   check=True)
    return np.fromfile(out, dtype="<f4").reshape(-1, vocab)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_official_gguf_matches_llama2c(dtype, tmp_path):
    import torch
    c = llama_reference.load_checkpoint(MODEL, torch.float32)
    path = tmp_path / "model.gguf"
    write_gguf(path, c, dtype)
    want = logits(MODEL, tmp_path, c.vocab)
    got = logits(path, tmp_path, c.vocab)
    if dtype == np.float32:
        assert np.array_equal(got, want)
    else:
        assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) < 1e-2
