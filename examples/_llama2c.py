"""Load a llama2.c legacy checkpoint (e.g. models/echo-llama-6m/model.bin, the
project's small trained byte-level model) as a Hugging Face LlamaForCausalLM,
so the examples can measure AttentionEcho on real trained attention.

llama2.c rotates adjacent pairs (2i, 2i+1) with RoPE; transformers rotates
(i, i + head_dim/2). Permuting the rows of wq and wk inside each head (the
usual conversion) gives identical q . k products, so the model is the same.
Token ids of that model: 1 = BOS, 3 + b = byte b.
"""

from __future__ import annotations

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "models", "echo-llama-6m", "model.bin")
DEFAULT_TEXT = os.path.join(HERE, "..", "models", "echo-llama-6m", "heldout.txt")


def encode(text: str):
    """Byte-level ids: BOS then 3 + byte."""
    return [1] + [b + 3 for b in text.encode("utf-8")]


def load_llama2c(path: str = DEFAULT_MODEL):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(x) for x in np.frombuffer(f.read(28), dtype="<i4"))
        weights = np.frombuffer(f.read(), dtype="<f4")
    shared = bool(vocab > 0)
    vocab = abs(int(vocab))
    hd = dim // n_heads
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        out = weights[offset:offset + n].reshape(shape)
        offset += n
        return torch.from_numpy(out.copy())

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, n_kv * hd, dim)
    wv = take(n_layers, n_kv * hd, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real (recomputed by transformers)
    take(seq_len, hd // 2)  # freq_cis_imag
    wcls = emb if shared else take(vocab, dim)

    def pairs_to_halves(w, heads):
        return w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(heads * hd, -1)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=int(dim), intermediate_size=int(hidden), num_hidden_layers=int(n_layers),
        num_attention_heads=int(n_heads), num_key_value_heads=int(n_kv), max_position_embeddings=int(seq_len),
        rms_norm_eps=1e-5, tie_word_embeddings=shared, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": wcls}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = rms_att[i]
        state[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        state[p + "self_attn.q_proj.weight"] = pairs_to_halves(wq[i], n_heads)
        state[p + "self_attn.k_proj.weight"] = pairs_to_halves(wk[i], n_kv)
        state[p + "self_attn.v_proj.weight"] = wv[i]
        state[p + "self_attn.o_proj.weight"] = wo[i]
        state[p + "mlp.gate_proj.weight"] = w1[i]
        state[p + "mlp.down_proj.weight"] = w2[i]
        state[p + "mlp.up_proj.weight"] = w3[i]
    model.load_state_dict(state, strict=False)
    return model.eval()


def heldout_documents(path: str = DEFAULT_TEXT, min_bytes: int = 0):
    """The held-out documents (name, text) of models/echo-llama-6m/heldout.txt."""
    import re

    text = open(path, encoding="utf-8").read()
    parts = re.split(r"^#### FILE: (.*) ####$\n", text, flags=re.M)
    docs = [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    return [d for d in docs if len(d[1].encode()) >= min_bytes]


def rename_identifier(text: str, seed: int = 0):
    """A near-duplicate of ``text``: its most frequent long identifier renamed
    to another of the same length (so token positions stay aligned), the way a
    templated prompt differs between users."""
    import collections
    import keyword
    import re

    words = collections.Counter(w for w in re.findall(r"\b[A-Za-z_]{6,}\b", text) if not keyword.iskeyword(w))
    if not words:
        return text
    word = words.most_common(1)[0][0]
    rng = np.random.default_rng(seed)
    new = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=len(word)))
    return re.sub(rf"\b{word}\b", new, text)


def capture_qkv(model, ids):
    """Run ``model`` on ``ids`` (1, T) and return per layer the attention
    inputs (q [H,T,D], k [Hkv,T,D], v [Hkv,T,D]) as float32 NumPy arrays."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = tuple(x[0].detach().contiguous().numpy() for x in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ae_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("ae_capture")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in sorted(captured)]
