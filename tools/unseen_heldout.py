#!/usr/bin/env python3
"""Writes a held-out text the bundled model never saw (it was trained on
CPython's Lib/): C headers from /usr/include as code and licence / README
texts from /usr/share as prose, in the `#### FILE: name ####` format that
`aecho bench --heldout` reads. What it picks depends on the machine's
packages; the seed fixes the choice among them.

    python3 tools/unseen_heldout.py -o build/unseen.txt
    build/release/aecho bench --scenario all --heldout build/unseen.txt
"""
import argparse
import glob
import os
import random


def documents(pattern_list, low, high):
    files = sorted({f for p in pattern_list for f in glob.glob(p) if os.path.isfile(f) and not f.endswith(".gz")})
    return [f for f in files if low < os.path.getsize(f) < high]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    code = documents(["/usr/include/*.h"], 3000, 60000)
    prose = documents(["/usr/share/common-licenses/*", "/usr/share/doc/*/README*", "/usr/share/doc/*/*.txt"],
                      3000, 80000)
    rng.shuffle(code)
    rng.shuffle(prose)
    out = [f"#### FILE: include/{os.path.basename(f)} ####\n" + open(f, errors="replace").read() for f in code[:40]]
    texts = [open(f, errors="replace").read() for f in prose]
    texts = [t for t in texts if t.count("\n") >= 40][:30]  # aecho skips documents under 40 lines
    out += [f"#### FILE: docs/{n}.txt ####\n" + t for n, t in enumerate(texts)]
    with open(args.output, "w") as f:
        f.write("\n".join(out))
    print(f"{args.output}: {min(len(code), 40)} headers, {len(texts)} prose documents")


if __name__ == "__main__":
    main()
