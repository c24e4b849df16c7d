#!/usr/bin/env python3
"""Writes a held-out text the bundled model never saw (it was trained on
CPython's Lib/), in the `#### FILE: name ####` format that `aecho bench
--heldout` reads. Kinds:

  mixed    (default) 40 C headers from /usr/include as code and licence /
           README texts from /usr/share as prose
  python   about 1.5 MB of Python files from this interpreter's
           site-packages (not CPython's Lib/)
  headers  about 1.5 MB of C headers from anywhere under /usr/include

What it picks depends on the machine's packages; the seed fixes the choice
among them.

    python3 tools/unseen_heldout.py -o build/unseen.txt
    build/release/aecho bench --scenario all --heldout build/unseen.txt
"""
import argparse
import glob
import os
import random
import sysconfig

BUDGET = 1_500_000  # bytes of a python or headers text


def documents(pattern_list, low, high, recursive=False):
    files = sorted({f for p in pattern_list for f in glob.glob(p, recursive=recursive)
                    if os.path.isfile(f) and not f.endswith(".gz")})
    return [f for f in files if low < os.path.getsize(f) < high]


def mixed(rng):
    code = documents(["/usr/include/*.h"], 3000, 60000)
    prose = documents(["/usr/share/common-licenses/*", "/usr/share/doc/*/README*", "/usr/share/doc/*/*.txt"],
                      3000, 80000)
    rng.shuffle(code)
    rng.shuffle(prose)
    out = [f"#### FILE: include/{os.path.basename(f)} ####\n" + open(f, errors="replace").read() for f in code[:40]]
    texts = [open(f, errors="replace").read() for f in prose]
    texts = [t for t in texts if t.count("\n") >= 40][:30]  # aecho skips documents under 40 lines
    out += [f"#### FILE: docs/{n}.txt ####\n" + t for n, t in enumerate(texts)]
    return out, f"{min(len(code), 40)} headers, {len(texts)} prose documents"


def up_to_budget(rng, files, what):
    rng.shuffle(files)
    out, size = [], 0
    for f in files:
        text = open(f, errors="replace").read()
        if text.count("\n") < 40:  # aecho skips documents under 40 lines
            continue
        out.append(f"#### FILE: {f} ####\n" + text)
        size += len(out[-1])
        if size >= BUDGET:
            break
    return out, f"{len(out)} {what}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--kind", choices=["mixed", "python", "headers"], default="mixed")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.kind == "mixed":
        out, what = mixed(rng)
    elif args.kind == "python":
        site = sysconfig.get_paths()["purelib"]
        out, what = up_to_budget(rng, documents([site + "/**/*.py"], 3000, 60000, recursive=True), "Python files")
    else:
        out, what = up_to_budget(rng, documents(["/usr/include/**/*.h"], 3000, 60000, recursive=True), "C headers")
    if not out:
        raise SystemExit(f"no {args.kind} documents on this machine")
    with open(args.output, "w") as f:
        f.write("\n".join(out))
    print(f"{args.output}: {what}")


if __name__ == "__main__":
    main()
