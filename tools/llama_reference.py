#!/usr/bin/env python3
"""Plain PyTorch (CPU) reference forward pass for llama2.c legacy checkpoints.

This is the oracle the C++ engine's tests compare logits against. It is
written for clarity: the whole sequence goes through at once with an explicit
causal mask, in float64 by default (float32 with --float32).

llama2.c legacy format (what ``load_checkpoint`` reads):
  header: 7 x int32 little-endian
      dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
      vocab_size < 0 means an unshared classifier (wcls stored at the end);
      vocab_size > 0 means the classifier is the token embedding.
  then float32 arrays, in this order (shapes row-major, [out, in] for matrices):
      token_embedding [vocab, dim]
      rms_att         [n_layers, dim]
      wq              [n_layers, n_heads*hd, dim]       hd = dim / n_heads
      wk              [n_layers, n_kv_heads*hd, dim]
      wv              [n_layers, n_kv_heads*hd, dim]
      wo              [n_layers, dim, n_heads*hd]
      rms_ffn         [n_layers, dim]
      w1              [n_layers, hidden, dim]   (gate, goes through SiLU)
      w2              [n_layers, dim, hidden]   (down)
      w3              [n_layers, hidden, dim]   (up)
      rms_final       [dim]
      freq_cis_real   [seq_len, hd/2]  (ignored here; recomputed, theta 10000)
      freq_cis_imag   [seq_len, hd/2]
      wcls            [vocab, dim]     only when vocab_size < 0

Math (same as llama2.c run.c):
  RMSNorm: x * w / sqrt(mean(x^2) + 1e-5)
  RoPE: within each head, pairs (2i, 2i+1) rotate by angle pos * 10000^(-2i/hd)
  GQA: query head h reads kv head h // (n_heads / n_kv_heads)
  attention scale 1/sqrt(hd), causal; FFN: w2(silu(w1 x) * w3 x); logits =
  wcls @ rmsnorm(x, rms_final).

CLI:
  python3 tools/llama_reference.py MODEL.bin --tokenizer TOK.bin --generate 40
      greedy decoding from BOS (token 1), prints the decoded text
  python3 tools/llama_reference.py MODEL.bin --tokens 1,72,101 --print-logits
  python3 tools/llama_reference.py MODEL.bin --ppl-stream FILE [--windows N]
      perplexity over non-overlapping seq_len windows of a token stream stored
      as raw little-endian int32 ids
  Verified: aidreams260K.bin greedy from BOS decodes (with tok512.bin) to
  '"Echoes of vectors unfold, a gentle hum of precision, ...'.
  Python use: c = load_checkpoint(path); logits = forward(c, token_ids)
"""
import argparse
import math
import struct
import sys

import numpy as np
import torch


class Checkpoint:
    pass


def load_checkpoint(path, dtype=torch.float64):
    with open(path, "rb") as f:
        raw = f.read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    w = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > w.size:
            raise ValueError("checkpoint %s truncated" % path)
        t = torch.from_numpy(w[pos:pos + n].astype(np.float64).reshape(shape)).to(dtype)
        pos += n
        return t

    c = Checkpoint()
    c.dim, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads = dim, hidden, n_layers, n_heads, n_kv_heads
    c.vocab, c.seq_len, c.head_dim, c.shared = vocab, seq_len, hd, shared
    c.tok = take(vocab, dim)
    c.rms_att = take(n_layers, dim)
    c.wq = take(n_layers, n_heads * hd, dim)
    c.wk = take(n_layers, n_kv_heads * hd, dim)
    c.wv = take(n_layers, n_kv_heads * hd, dim)
    c.wo = take(n_layers, dim, n_heads * hd)
    c.rms_ffn = take(n_layers, dim)
    c.w1 = take(n_layers, hidden, dim)
    c.w2 = take(n_layers, dim, hidden)
    c.w3 = take(n_layers, hidden, dim)
    c.rms_final = take(dim)
    c.freq_real = take(seq_len, hd // 2)
    c.freq_imag = take(seq_len, hd // 2)
    c.wcls = c.tok if shared else take(vocab, dim)
    if pos != w.size:
        raise ValueError("checkpoint %s: %d trailing floats" % (path, w.size - pos))
    c.dtype = dtype
    return c


def rmsnorm(x, w, eps=1e-5):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, pos0=0, factors=None):
    """x: [T, H, hd]; rotate interleaved pairs (2i, 2i+1); frequencies
    divided by factors [hd/2] if given (GGUF rope_freqs.weight)."""
    T, H, hd = x.shape
    i = torch.arange(0, hd, 2, dtype=torch.float64)
    freq = 1.0 / (10000.0 ** (i / hd))
    if factors is not None:
        freq = freq / torch.as_tensor(factors, dtype=torch.float64)
    ang = torch.outer(torch.arange(pos0, pos0 + T, dtype=torch.float64), freq)  # [T, hd/2]
    cos = torch.cos(ang).to(x.dtype)[:, None, :]
    sin = torch.sin(ang).to(x.dtype)[:, None, :]
    xr = x.reshape(T, H, hd // 2, 2)
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(T, H, hd)


@torch.no_grad()
def forward(c, tokens, on_qkv=None):
    """Logits [T, vocab] for a token list (positions 0..T-1). on_qkv(layer,
    q, k, v), if given, sees each layer's [T, heads, hd] q and k (after RoPE)
    and v (kv heads), as the attention reads them."""
    tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    T = tokens.numel()
    if T > c.seq_len:
        raise ValueError("sequence of %d tokens exceeds seq_len %d" % (T, c.seq_len))
    hd, H, Hkv = c.head_dim, c.n_heads, c.n_kv_heads
    rep = H // Hkv
    x = c.tok[tokens]
    mask = torch.full((T, T), float("-inf"), dtype=c.dtype).triu(1)
    for l in range(c.n_layers):
        h = rmsnorm(x, c.rms_att[l])
        factors = getattr(c, "rope_factors", None)
        q = rope((h @ c.wq[l].T).view(T, H, hd), factors=factors)
        k = rope((h @ c.wk[l].T).view(T, Hkv, hd), factors=factors)
        v = (h @ c.wv[l].T).view(T, Hkv, hd)
        if on_qkv is not None:
            on_qkv(l, q, k, v)
        k = k.repeat_interleave(rep, dim=1)  # head h -> kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hts,shd->thd", p, v).reshape(T, H * hd)
        x = x + o @ c.wo[l].T
        h = rmsnorm(x, c.rms_ffn[l])
        g = h @ c.w1[l].T
        x = x + (torch.nn.functional.silu(g) * (h @ c.w3[l].T)) @ c.w2[l].T
    return rmsnorm(x, c.rms_final) @ c.wcls.T


def load_tokenizer(path, vocab):
    pieces, scores = [], []
    with open(path, "rb") as f:
        (max_len,) = struct.unpack("<i", f.read(4))
        for _ in range(vocab):
            score, n = struct.unpack("<fi", f.read(8))
            pieces.append(f.read(n))
            scores.append(score)
    return pieces, scores, max_len


def decode(pieces, ids):
    """llama2.c run.c decode: strip a leading space after BOS, <0xXX> -> byte."""
    out, prev = b"", 1
    for t in ids:
        p = pieces[t]
        if prev == 1 and p.startswith(b" "):
            p = p[1:]
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            p = bytes([int(p[3:5], 16)])
        out += p
        prev = t
    return out


def greedy(c, n, start=(1,)):
    ids = list(start)
    for _ in range(n):
        ids.append(int(forward(c, ids)[-1].argmax()))
    return ids


def byte_stream(data):
    """Byte-level model convention: one document -> [1] + [b + 3] + [2]."""
    return [1] + [b + 3 for b in data] + [2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--float32", action="store_true", help="compute in float32 instead of float64")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--print-logits", action="store_true")
    ap.add_argument("--ppl-stream", help="raw file of little-endian int32 token ids")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c = load_checkpoint(args.model, torch.float32 if args.float32 else torch.float64)
    print("config: dim %d hidden %d layers %d heads %d kv_heads %d vocab %d seq_len %d shared %s" %
          (c.dim, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab, c.seq_len, c.shared))
    if args.generate:
        ids = greedy(c, args.generate)
        print("ids:", ids)
        if args.tokenizer:
            pieces, _, _ = load_tokenizer(args.tokenizer, c.vocab)
            sys.stdout.write(decode(pieces, ids[1:] if ids[0] == 1 else ids).decode("utf-8", "replace") + "\n")
    if args.tokens:
        ids = [int(t) for t in args.tokens.split(",")]
        logits = forward(c, ids)
        print("argmax:", logits.argmax(-1).tolist())
        if args.print_logits:
            np.set_printoptions(precision=6, suppress=True)
            print(logits.numpy())
    if args.ppl_stream:
        stream = np.fromfile(args.ppl_stream, dtype="<i4")
        T = c.seq_len
        nll, n = 0.0, 0
        for w in range(args.windows):
            s = w * T
            if s + T + 1 > stream.size:
                break
            x = stream[s:s + T].tolist()
            y = torch.as_tensor(stream[s + 1:s + T + 1].astype(np.int64))
            lp = torch.log_softmax(forward(c, x).double(), -1)
            nll += -lp[torch.arange(T), y].sum().item()
            n += T
            print("window %d: running ppl %.6f" % (w, math.exp(nll / n)), flush=True)
        print("ppl over %d tokens: %.6f (nll/token %.6f nats)" % (n, math.exp(nll / n), nll / n))


if __name__ == "__main__":
    main()
