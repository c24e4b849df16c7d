"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): a few
small valid inputs per target, which the fuzzer mutates. Deterministic;
needs the installed attention_echo package (snapshots), gguf and torch (GGUF,
through tools/llama2c_to_gguf.py).

    .venv/bin/python tools/make_fuzz_corpus.py [fuzz/corpus]
"""

import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

import llama2c_to_gguf  # tools/, beside this script
from attention_echo import AttentionEchoCache, EchoConfig

HEADER = 28  # snapshot magic, version, body size, checksum (src/cache/snapshot.cpp)


def write(root, target, name, data):
    os.makedirs(os.path.join(root, target), exist_ok=True)
    with open(os.path.join(root, target, name), "wb") as f:
        f.write(data)


def random_inputs(root, target, seed, sizes=(32, 256, 1024, 4096)):
    # Any bytes are an input of these targets (they read shapes, choices
    # and values from whatever they get): sizes from a small request or a
    # few operations to the largest they build.
    rng = np.random.default_rng(seed)
    for i, size in enumerate(sizes):
        name = f"random_{size}" if sizes.count(size) == 1 else f"random_{size}_{i}"
        write(root, target, name, rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def snapshot(root, tmp):
    # The shape fuzz_snapshot.cpp serves: H=2, Hkv=1, T=24, D=8, prefix 16,
    # embeddings 16x8, tokens 0..15; one cache per approximate mode.
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 24, 8)).astype(np.float32)
    k = rng.standard_normal((1, 24, 8)).astype(np.float32)
    v = rng.standard_normal((1, 24, 8)).astype(np.float32)
    emb = (np.arange(16 * 8) % 8 - 3.5).astype(np.float32).reshape(16, 8)
    for mode in ("sparse", "dense"):
        cache = AttentionEchoCache(EchoConfig(mode=mode, block_size=32, threads=1))
        cache.attention_with_echo(q, k, v, 16, emb, prefix_tokens=np.arange(16, dtype=np.int32))
        cache.attention_with_echo(q, k, v, 16, emb, namespace="tenant")
        path = os.path.join(tmp, f"snapshot_{mode}.bin")
        cache.save(path)
        data = open(path, "rb").read()
        os.remove(path)
        write(root, "snapshot", f"{mode}_body", b"\x00" + data[HEADER:])  # the target adds the header
        write(root, "snapshot", f"{mode}_file", b"\x01" + data)


def tiny_weights(dim=8, hidden=16, layers=1, heads=2, kv_heads=1, vocab=16):
    rng = np.random.default_rng(3)
    kv = dim // heads * kv_heads

    def w(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    return {
        "embed": w(vocab, dim), "layers": [
            {"attn_norm": np.ones(dim, np.float32), "wq": w(dim, dim), "wk": w(kv, dim), "wv": w(kv, dim),
             "wo": w(dim, dim), "ffn_norm": np.ones(dim, np.float32), "w1": w(hidden, dim), "w2": w(dim, hidden),
             "w3": w(hidden, dim)} for _ in range(layers)],
        "norm": np.ones(dim, np.float32), "config": (dim, hidden, layers, heads, kv_heads, vocab, 8),
    }


def llama2c(root):
    m = tiny_weights()
    dim, hidden, layers, heads, kv_heads, vocab, seq = m["config"]
    out = [struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq), m["embed"].tobytes()]
    for key in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
        out += [layer[key].tobytes() for layer in m["layers"]]
    out.append(m["norm"].tobytes())
    out.append(np.zeros(seq * (dim // heads), np.float32).tobytes())  # freq_cis (not read)
    write(root, "llama2c_loader", "tiny_shared_classifier", b"".join(out))


def gguf(root, tmp):
    write(root, "gguf_loader", "tiny_llama", tiny_gguf(tmp, tiny_weights()))
    # 32-wide matrices in Q8_0, Q4_1 and Q5_0 (legacy 32-value blocks) and a
    # SentencePiece vocabulary: seeds the dequantizers and the tokenizer
    # metadata reader.
    types = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0]
    vocabulary = (["<unk>", "<s>", "</s>", "\u2581t", "he", "\u2581the", "<0x41>"] + list("abcdefghi"),
                  [float(-i) for i in range(16)], [2, 3, 3, 1, 1, 1, 6] + [1] * 9)
    write(root, "gguf_loader", "tiny_quantized_with_vocabulary",
          tiny_gguf(tmp, tiny_weights(dim=32, hidden=64), lambda name: types[len(name) % len(types)], vocabulary))
    # A byte-level BPE ("gpt2") vocabulary: GPT-2's 256-letter byte alphabet,
    # four merged tokens and their merges; seeds the byte-level tokenizer.
    alphabet = [chr(b) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or b >= 0xAE else None for b in range(256)]
    spare = iter(range(256, 512))
    alphabet = [c if c is not None else chr(next(spare)) for c in alphabet]
    tokens = alphabet + ["th", "\u0120th", "the", "\u0120the"]
    merges = ["t h", "\u0120 th", "th e", "\u0120th e"]
    write(root, "gguf_loader", "tiny_byte_level_vocabulary",
          tiny_gguf(tmp, tiny_weights(vocab=len(tokens)), vocabulary=(tokens, [0.0] * len(tokens), [1] * len(tokens)),
                    tokenizer_model="gpt2", merges=merges, pre="gpt2"))


def tiny_gguf(tmp, m, quantize_as=None, vocabulary=None, tokenizer_model="llama", merges=None, pre=None):
    """tiny_weights m as the bytes of a GGUF file: matrices F32, or in the
    type quantize_as(name) picks; a (tokens, scores, types) vocabulary of
    the kind tokenizer_model, with merges and a pre-tokenizer if given."""
    dim, hidden, layers, heads, kv_heads, vocab, seq = m["config"]
    path = os.path.join(tmp, "tiny.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_feed_forward_length(hidden)
    writer.add_context_length(seq)
    if vocabulary:
        llama2c_to_gguf.add_vocabulary(writer, vocabulary, tokenizer_model, merges, pre)

    def tensor(name, t):
        if quantize_as is None or t.ndim == 1:
            writer.add_tensor(name, t)
        else:
            writer.add_tensor(name, quants.quantize(t, quantize_as(name)), raw_dtype=quantize_as(name))

    tensor("token_embd.weight", m["embed"])
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
    for i, layer in enumerate(m["layers"]):
        for key, name in names.items():
            tensor(f"blk.{i}.{name}.weight", layer[key])
    tensor("output_norm.weight", m["norm"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = open(path, "rb").read()
    os.remove(path)
    return data


def tokenizer(root):
    # <unk>, <s>, </s>, the 256 byte tokens, a few merges; input =
    # u16 vocabulary size, u8 text length, text, tokenizer.bin.
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    pieces += [b" t", b"he", b" the", b"in", b"er", b" a", b"on", b"re"]
    body = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        body += struct.pack("<fi", float(-i), len(p)) + p
    for text in (b"the theory is here", b"\xff\x00 a\xc3\xa9"):
        write(root, "tokenizer", f"text_{len(text)}", struct.pack("<HB", len(pieces), len(text)) + text + body)


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fuzz", "corpus")
    tmp = os.path.join(root, ".tmp")
    os.makedirs(tmp, exist_ok=True)
    random_inputs(root, "cache_request", 1, sizes=(16, 64, 512, 4096))
    random_inputs(root, "token_alignment", 3)
    random_inputs(root, "kv_block_store", 4)
    random_inputs(root, "kv_l2", 6)
    random_inputs(root, "cache_l2", 7)
    # The planner's config is read first (from the end), and mutations seldom
    # reach it: a dozen seeds, a dozen configs.
    random_inputs(root, "planner", 5, sizes=(256, 512, 1024, 2048) * 3)
    snapshot(root, tmp)
    llama2c(root)
    gguf(root, tmp)
    tokenizer(root)
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
