#!/usr/bin/env python3
"""`aecho bench --scenario all` on the bundled held-out text and three texts
the model never saw, for one build or two side by side, and one table:
echo / exact-prefix per scenario, blends (refused), the targets missed
(../shared/tools/check_bench.py, where it is) and the geomean over every
scenario run. For judging a serving change on more than the bundled text.

    python3 tools/unseen_sweep.py --out build/sweep build/release/aecho [OTHER/aecho] [-- BENCH ARGS]

Texts (tools/unseen_heldout.py, written into --out once): `mixed` (C headers
and licence texts, seed 3), `python` (this interpreter's site-packages; run
it with the venv's python to get more than the standard library's) and
`headers` (served with bench --seed 7). With two builds each text is served
by both in turn, so a slow spell of the machine hits both alike. --text
NAME=PATH adds a text of your own (a second model's held-out text). BENCH ARGS
go to every run (e.g. `--repeats 1` for a quick pass: about 6 minutes a build
at full context on a 2-core machine, 1.5 at 1024 tokens; timer noise a few %
a scenario). --seeds N serves every text with N bench seeds (its own and the
N - 1 after it): which blends a namespace's guard lets through turns on one
or two noisy calibration samples (BENCHMARKS.md section 14), so judge a
change to the guard or the planner over several. Runs one bench at a time:
nothing else should run beside it.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "..", "shared", "tools", "check_bench.py")
Row = namedtuple("Row", "scenario ratio blends refused screens screens_refused")  # ratio: echo / exact-prefix
TEXTS = [  # name, unseen_heldout.py kind (None: the bundled text), bench seed
    ("bundled", None, 1),
    ("mixed", "mixed", 1),
    ("python", "python", 1),
    ("headers", "headers", 7),
]


def text_path(out, name, kind):
    if kind is None:
        return os.path.join(ROOT, "models", "echo-llama-6m", "heldout.txt")
    path = os.path.join(out, f"{name}.txt")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "unseen_heldout.py"), "--kind", kind, "-o", path],
                       check=True)
    return path


def summary(path):
    """Per scenario: echo / exact-prefix, blends and refused ones; the
    targets check_bench says are missed; and how many of those are fidelity
    misses."""
    doc = json.load(open(path))
    rows = []
    for s in doc["scenarios"]:
        echo, exact = s["modes"]["echo"], s["modes"]["exact-prefix"]
        detail = echo["requests_detail"]
        rows.append(Row(s["scenario"], echo["prefill_speedup"] / exact["prefill_speedup"],
                        sum(q["route"] == "blend" for q in detail), sum(q["blend_rejected"] for q in detail),
                        echo.get("blend_screened", 0), echo.get("screened_refused", 0)))
    missed, fidelity = "", 0
    if os.path.exists(CHECK):
        r = subprocess.run([sys.executable, CHECK, path], capture_output=True, text=True)
        if r.returncode == 0:
            missed = "passes"
        else:
            missed, fidelity = short_misses(r.stdout.strip().splitlines()[-1])
    return rows, missed, fidelity


def short_misses(line):
    """check_bench's "; "-separated misses: the scenarios below a speed target
    by name, fidelity misses in full; and the number of fidelity misses."""
    slow, fidelity = [], []
    for miss in line.split("; "):
        scenario = miss.split(":")[0]
        if "exact-prefix" in miss:
            slow += [scenario] if scenario not in slow else []
        else:
            fidelity.append(miss)
    return "; ".join((["slow: " + " ".join(slow)] if slow else []) + fidelity), len(fidelity)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the texts, JSON results and logs")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=PATH",
                        help="serve this text too (e.g. a second model's own held-out text)")
    parser.add_argument("--seeds", type=int, default=1, help="bench seeds per text (default 1)")
    parser.add_argument("aecho", nargs="+", help="one or two aecho binaries")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if len(args.aecho) > 2:
        parser.error("aecho: one or two binaries")
    if args.seeds < 1:
        parser.error("--seeds: at least 1")
    if "--seed" in bench_args:
        parser.error("--seed: each text has its own; give --seeds N before --")
    args.out = os.path.abspath(args.out)  # aecho runs in the repository root
    args.aecho = [os.path.abspath(a) for a in args.aecho]
    os.makedirs(args.out, exist_ok=True)
    table = {b: [] for b in range(len(args.aecho))}
    texts = [(name, text_path(args.out, name, kind), seed) for name, kind, seed in TEXTS]
    texts += [(name, os.path.abspath(path), 1) for name, _, path in (t.partition("=") for t in args.text)]
    runs = [(name if args.seeds == 1 else f"{name}-s{seed + s}", heldout, seed + s)
            for name, heldout, seed in texts for s in range(args.seeds)]
    for name, heldout, seed in runs:
        for b, aecho in enumerate(args.aecho):
            result = os.path.join(args.out, f"{name}-{b}.json")
            with open(os.path.join(args.out, f"{name}-{b}.log"), "w") as log:
                subprocess.run([aecho, "bench", "--scenario", "all", "--heldout", heldout, "--threads", "2",
                                "--seed", str(seed), *bench_args, "--json", result],
                               check=True, stdout=log, stderr=log, cwd=ROOT)
            rows, missed, fidelity = summary(result)
            table[b].append((name, rows, missed, fidelity))
            ratios = " / ".join(f"{r.ratio:.2f}" for r in rows)
            print(f"{name:8} build {b}: {ratios}  {missed}", flush=True)
    scenarios = [r.scenario for r in table[0][0][1]]
    print("\n| build | text | " + " | ".join(scenarios) + " | blends (refused) | check_bench |")
    print("|---" * (len(scenarios) + 4) + "|")
    for b, results in table.items():
        fidelity_misses = 0
        for name, rows, missed, fidelity in results:
            fidelity_misses += fidelity
            blends, refused = sum(r.blends for r in rows), sum(r.refused for r in rows)
            print(f"| {b} | {name} | " + " | ".join(f"{r.ratio:.2f}" for r in rows) +
                  f" | {blends} ({refused}) | {missed} |")
        every = [r for _, rows, _, _ in results for r in rows]
        logs = [math.log(r.ratio) for r in every]
        under = sum(log < math.log(0.97) for log in logs)
        print(f"build {b} ({args.aecho[b]}): geomean {math.exp(sum(logs) / len(logs)):.3f}x over {len(logs)} runs, "
              f"{under} under 0.97x, {fidelity_misses} fidelity misses; blends {sum(r.blends for r in every)} "
              f"({sum(r.refused for r in every)} refused), screens {sum(r.screens for r in every)} "
              f"({sum(r.screens_refused for r in every)} refused)")
        # Per scenario: which workloads carry the geomean and the runs under the floor.
        for scenario in scenarios:
            mine = [math.log(r.ratio) for r in every if r.scenario == scenario]
            print(f"  {scenario}: geomean {math.exp(sum(mine) / len(mine)):.3f}x, "
                  f"{sum(log < math.log(0.97) for log in mine)} of {len(mine)} under 0.97x")


if __name__ == "__main__":
    main()
