#!/usr/bin/env python3
"""Corpus and tokenizer for a second evaluation model (models/echo-llama-doc),
unlike the bundled one in every way the planner could have been tuned to:
English documentation (man pages' troff source less the 16k generated gcloud
pages, /usr/share/doc's READMEs and changelogs, Vim's help) instead of Python
source, and a SentencePiece BPE vocabulary (4096 pieces, byte fallback,
trained the way llama2.c's train_vocab does) instead of bytes.

    .venv/bin/pip install sentencepiece   # this tool's own dependency
    .venv/bin/python tools/prepare_doc_corpus.py --out data_doc

writes into --out: tokenizer.model (SentencePiece), tokenizer.bin (llama2.c's
format, what the engine reads), {train,heldout}.ids (uint16 token ids, every
document [BOS] + its pieces, as llama2.c pretokenizes), heldout.txt (the
held-out documents' text, for `aecho bench --heldout`) and manifest.json.
Documents are split by a hash of their path (1 in 20 held out), so the
held-out text is from files the model never saw. tools/train_eval_model.py
--data data_doc trains on it (it reads the .ids and the vocabulary size from
the manifest).
"""
import argparse
import gzip
import hashlib
import json
import os
import struct

import numpy as np
import sentencepiece as spm

SOURCES = ["/usr/share/man/man1", "/usr/share/man/man3", "/usr/share/man/man5", "/usr/share/man/man7",
           "/usr/share/man/man8", "/usr/share/doc", "/usr/share/vim/vim90/doc"]
SUFFIXES = (".gz", ".txt", ".md", ".1", ".3", ".3pm", ".5", ".7", ".8")


def documents(max_bytes):
    """(path, text) of readable documents in an order fixed by a hash of their
    paths (every source mixed in), until max_bytes of text."""
    paths = []
    for root in SOURCES:
        for folder, _, files in os.walk(root):
            paths += [os.path.join(folder, f) for f in files
                      if (f.endswith(SUFFIXES) or f in ("README", "NEWS")) and not f.startswith("gcloud")]
    total = 0
    for path in sorted(paths, key=lambda p: hashlib.sha1(p.encode()).digest()[1:]):
        try:
            raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
            text = raw.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if len(text) < 200 or "\0" in text:
            continue
        yield path, text
        total += len(text)
        if total >= max_bytes:
            return


def held_out(path):
    return hashlib.sha1(path.encode()).digest()[0] % 20 == 0


def export_llama2c_tokenizer(sp, path):
    """llama2.c's tokenizer.bin: max piece length, then per id (score, length,
    UTF-8 bytes), U+2581 spelt as a space and BOS/EOS as llama2.c spells them."""
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        piece = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else piece.replace("\u2581", " ")
        pieces.append(piece.encode("utf-8"))
        scores.append(sp.get_score(i))
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fI", score, len(piece)))
            f.write(piece)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data_doc")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-bytes", type=int, default=30_000_000, help="text read, train and held out together")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    docs = list(documents(a.max_bytes))
    split = {"train": [d for d in docs if not held_out(d[0])], "heldout": [d for d in docs if held_out(d[0])]}
    sample = os.path.join(a.out, "vocab_sample.txt")
    with open(sample, "w") as f:
        f.write("\n".join(text for _, text in split["train"]))
    spm.SentencePieceTrainer.train(
        input=sample, model_prefix=os.path.join(a.out, "tokenizer"), model_type="bpe", vocab_size=a.vocab,
        self_test_sample_size=0, input_format="text", character_coverage=1.0, num_threads=os.cpu_count(),
        split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True, unk_surface=r" \342\201\207 ",
        normalization_rule_name="identity", input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=16384)
    os.remove(sample)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.out, "tokenizer.model"))
    export_llama2c_tokenizer(sp, os.path.join(a.out, "tokenizer.bin"))
    manifest = {"vocab": sp.get_piece_size(), "bos": sp.bos_id(), "eos": sp.eos_id(), "sources": SOURCES}
    for name, part in split.items():
        ids = [[sp.bos_id()] + sp.encode(text) for _, text in part]
        np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]).tofile(os.path.join(a.out, name + ".ids"))
        manifest[name] = {"documents": len(part), "bytes": sum(len(t) for _, t in part),
                          "tokens": sum(len(x) for x in ids)}
    with open(os.path.join(a.out, "heldout.txt"), "w") as f:
        f.write("\n\n".join(text for _, text in split["heldout"]))
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
