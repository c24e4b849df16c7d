#!/usr/bin/env python3
"""Build the byte-level training corpus for the AttentionEcho evaluation model.

Sources (all real text shipped with CPython 3.11.7 on these machines):
  * every ``*.py`` file of the standard library (``lib/python3.11``), tests
    included, ``site-packages`` and ``__pycache__`` excluded;
  * ``pydoc_data/topics.py`` is NOT taken as code: each of its help topics
    (the reference-manual text that ``help('topic')`` prints) becomes one
    prose document named ``pydoc_topics/<topic>``;
  * ``*.txt`` / ``*.rst`` documentation files outside test directories
    (idlelib README/NEWS, email/architecture.rst, LICENSE.txt, ...).

Split: deterministic by document name. ``bucket = int(sha256(name)[:8], 16) %
1000``; bucket < 50 (5%) goes to held-out, the rest to train. Documents are kept
whole (no file is split across train and held-out).

Outputs (``--out``, default ``data_build/``, gitignored):
  train.bytes / heldout.bytes   raw document bytes, concatenated, no separators
  train.idx / heldout.idx       int64 little-endian start offsets, one per
                                document plus a final end offset
  train.names / heldout.names   document names, one per line, same order
  manifest.json                 counts, sizes, sha256 of each output
and ``--heldout-txt`` (default ``models/echo-llama-6m/heldout.txt``): a
<= 1.5 MB sample of held-out documents for the benchmark workloads. Each
document in it is preceded by one line ``#### FILE: <name> ####`` and followed
by one newline; split it with the regex ``^#### FILE: (.*) ####$`` (the header
lines and the trailing newline are not part of the documents).

The trainer turns each document into tokens ``[BOS=1] + [b + 3 for b in doc] +
[EOS=2]`` (llama2.c byte convention: id 3 + byte value).

Usage (exactly what produced the committed model):
  python3 tools/prepare_corpus.py
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys

DEFAULT_LIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"
HELDOUT_PER_MILLE = 50
HELDOUT_TXT_LIMIT = 1_500_000


def bucket(name: str) -> int:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 1000


def is_test_path(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts[:-1])


def collect(lib: str):
    docs = []  # (name, bytes)
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for fn in sorted(files):
            path = os.path.join(root, fn)
            rel = os.path.relpath(path, lib).replace(os.sep, "/")
            if rel == "pydoc_data/topics.py":
                continue
            if fn.endswith(".py") or (fn.endswith((".txt", ".rst")) and not is_test_path(rel)):
                with open(path, "rb") as f:
                    data = f.read()
                if data.strip():
                    docs.append(("Lib/" + rel, data))
    spec = importlib.util.spec_from_file_location("_topics", os.path.join(lib, "pydoc_data", "topics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for key in sorted(mod.topics):
        docs.append(("pydoc_topics/" + key, mod.topics[key].encode("utf-8")))
    docs.sort(key=lambda d: d[0])
    return docs


def write_split(out, split, docs):
    import struct
    offs = [0]
    with open(os.path.join(out, split + ".bytes"), "wb") as f:
        for _, data in docs:
            f.write(data)
            offs.append(offs[-1] + len(data))
    with open(os.path.join(out, split + ".idx"), "wb") as f:
        f.write(struct.pack("<%dq" % len(offs), *offs))
    with open(os.path.join(out, split + ".names"), "w") as f:
        for name, _ in docs:
            f.write(name + "\n")
    return offs[-1]


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=DEFAULT_LIB, help="CPython 3.11 Lib directory")
    ap.add_argument("--out", default="data_build", help="output folder (gitignored)")
    ap.add_argument("--heldout-txt", default="models/echo-llama-6m/heldout.txt")
    ap.add_argument("--max-train-bytes", type=int, default=40_000_000)
    args = ap.parse_args()

    docs = collect(args.lib)
    train = [d for d in docs if bucket(d[0]) >= HELDOUT_PER_MILLE]
    held = [d for d in docs if bucket(d[0]) < HELDOUT_PER_MILLE]
    os.makedirs(args.out, exist_ok=True)
    ntrain = write_split(args.out, "train", train)
    nheld = write_split(args.out, "heldout", held)
    if ntrain > args.max_train_bytes:
        sys.exit("train corpus %d bytes exceeds --max-train-bytes" % ntrain)

    # Held-out sample for benchmark workloads: held-out docs in order of their
    # hash (deterministic, mixes code/tests/prose), <= 200 KB each, until full.
    sample, size = [], 0
    for name, data in sorted(held, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
        if len(data) > 200_000:
            continue
        piece = ("#### FILE: %s ####\n" % name).encode() + data + b"\n"
        if size + len(piece) > HELDOUT_TXT_LIMIT:
            continue
        sample.append((name, piece))
        size += len(piece)
    sample.sort()
    os.makedirs(os.path.dirname(args.heldout_txt) or ".", exist_ok=True)
    with open(args.heldout_txt, "wb") as f:
        for _, piece in sample:
            f.write(piece)

    manifest = {
        "lib": args.lib,
        "rule": "bucket=int(sha256(name)[:8],16)%1000; bucket<50 -> heldout",
        "train": {"docs": len(train), "bytes": ntrain,
                  "code_docs": sum(1 for n, _ in train if n.endswith(".py")),
                  "prose_docs": sum(1 for n, _ in train if not n.endswith(".py"))},
        "heldout": {"docs": len(held), "bytes": nheld,
                    "code_docs": sum(1 for n, _ in held if n.endswith(".py")),
                    "prose_docs": sum(1 for n, _ in held if not n.endswith(".py"))},
        "heldout_txt": {"path": args.heldout_txt, "docs": len(sample), "bytes": size},
        "sha256": {fn: sha(os.path.join(args.out, fn)) for fn in
                   ("train.bytes", "train.idx", "heldout.bytes", "heldout.idx")},
    }
    manifest["sha256"]["heldout.txt"] = sha(args.heldout_txt)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
