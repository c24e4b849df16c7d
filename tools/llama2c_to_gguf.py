#!/usr/bin/env python3
"""Writes a llama2.c checkpoint as a GGUF Llama model, its matrices in any
type gguf-py (llama.cpp's gguf package) quantizes: F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1. Norms stay F32, as llama.cpp's quantizer keeps them.
With --tokenizer, the llama2.c tokenizer.bin goes in as the file's
SentencePiece vocabulary (spaces spelt U+2581, as GGUF files spell them).

    .venv/bin/python tools/llama2c_to_gguf.py MODEL.bin --type Q4_0 -o MODEL.q4_0.gguf \
        [--tokenizer tokenizer.bin]

The engine dequantizes at load, so a quantized model's logits are those of
its quantized weights (tests/engine/test_gguf_quantized.py); this is how
the benchmark's models are run quantized (README, "Measured").
Python use: write_gguf(path, checkpoint, qtype, ...) returns a
llama_reference checkpoint holding what the file decodes to.
"""
import argparse
import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_reference  # noqa: E402

# llama.cpp's token types.
UNKNOWN, CONTROL, BYTE, NORMAL = 2, 3, 6, 1


def quantize(matrix, qtype):
    """(bytes as gguf-py's writer takes them, what they decode to)."""
    raw = quants.quantize(matrix.astype(np.float32), qtype)
    return raw, quants.dequantize(raw, qtype).reshape(matrix.shape)


def vocabulary_of(tokenizer_path, vocab):
    """(pieces, scores, token types) of a llama2.c tokenizer.bin."""
    pieces, scores, _ = llama_reference.load_tokenizer(tokenizer_path, vocab)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE if p.startswith(b"<0x") else NORMAL for p in pieces[3:]]
    return [p.replace(b" ", "\u2581".encode()) for p in pieces], scores, types


def add_vocabulary(w, vocabulary, model="llama", merges=None, pre=None):
    """A (pieces, scores, types) vocabulary of kind `model` into GGUFWriter w,
    with a byte-level one's merges and pre-tokenizer if given."""
    pieces, scores, types = vocabulary
    w.add_tokenizer_model(model)
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if pre is not None:
        w.add_tokenizer_pre(pre)


def write_gguf(path, c, qtype=Q.F32, layers=None, vocabulary=None, tokenizer_model="llama", encode=quantize,
               metadata=(), merges=None, bos=1, eos=2, rope_factors=None):
    """Checkpoint c (llama_reference) as a GGUF file: the first `layers`
    layers (all by default), matrices through encode(matrix, qtype), a
    vocabulary (pieces, scores, types) if given, with its BOS / EOS ids
    (None: not written) and a byte-level one's merges ("left right"), and
    (key, value) pairs of further metadata (str, bool or int), and RoPE
    frequency divisors [head_dim/2] as rope_freqs.weight if given. Returns
    a float64 checkpoint of what the file decodes to."""
    layers = c.n_layers if layers is None else layers
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in metadata:
        add = w.add_string if isinstance(value, str) else w.add_bool if isinstance(value, bool) else w.add_uint32
        add(key, value)
    if vocabulary is not None:
        add_vocabulary(w, vocabulary, tokenizer_model, merges)
        if bos is not None:
            w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
    ref = llama_reference.Checkpoint()
    for key in ("dim", "hidden", "n_heads", "n_kv_heads", "vocab", "seq_len", "head_dim", "shared"):
        setattr(ref, key, getattr(c, key))
    ref.n_layers, ref.dtype = layers, torch.float64

    def matrix(name, t):  # [out, in]: gguf-py writes ne = (in, out)
        t = t.numpy()
        if qtype in (Q.F32, Q.F16):
            raw = t.astype(np.float32 if qtype == Q.F32 else np.float16)
            w.add_tensor(name, raw)
            decoded = raw
        else:
            raw, decoded = encode(t, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
        return torch.from_numpy(decoded.astype(np.float64))

    def vector(name, t):
        w.add_tensor(name, t.numpy().astype(np.float32))
        return t.to(torch.float64)

    ref.tok = matrix("token_embd.weight", c.tok)
    per_layer = {key: [] for key in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w3", "w2")}
    for l in range(layers):
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
    if rope_factors is not None:
        ref.rope_factors = vector("rope_freqs.weight", torch.as_tensor(rope_factors, dtype=torch.float32))
    ref.wcls = ref.tok if c.shared else matrix("output.weight", c.wcls)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="llama2.c checkpoint (.bin)")
    ap.add_argument("--type", default="Q8_0", choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    ap.add_argument("--tokenizer", help="llama2.c tokenizer.bin to carry as the file's vocabulary")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    c = llama_reference.load_checkpoint(a.model, torch.float32)
    vocabulary = vocabulary_of(a.tokenizer, c.vocab) if a.tokenizer else None
    write_gguf(a.out, c, Q[a.type], vocabulary=vocabulary)
    print("%s: %s, %d bytes" % (a.out, a.type, os.path.getsize(a.out)))


if __name__ == "__main__":
    main()
