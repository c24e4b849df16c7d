#!/usr/bin/env python3
"""Plot `aecho bench --json` results: speedup against fidelity, one point per
scenario and serving mode.

    .venv/bin/python tools/plot_bench.py RESULT.json [MORE.json ...] -o docs/bench.png

Several JSON files (e.g. one per --mode) go on the same axes; the echo
points are labelled with the file's echo mode. Left: prefill speedup (time
to first token) against the relative error of the final hidden states.
Right: the same speedup against next-token top-1 agreement. Both against no
reuse, measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"chatbot": "o", "rag": "s", "code": "^", "near-dup": "D", "rag-shuffled": "P", "chat-edit": "v"}
COLORS = {"exact-prefix": "tab:blue", "sparse": "tab:green", "dense": "tab:red", "off": "tab:purple"}


def points(paths):
    """(scenario, series, prefill speedup, hidden error, top-1) per point."""
    seen = set()
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        for s in run["scenarios"]:
            for name, m in s["modes"].items():
                if name == "none":
                    continue
                series = run["mode"] if name == "echo" else name
                if (s["scenario"], series) in seen:
                    continue  # exact-prefix repeats in every file
                seen.add((s["scenario"], series))
                yield (s["scenario"], series, m["prefill_speedup"], max(m["hidden_rel_error_mean"], 1e-9),
                       m["top1_agreement"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("-o", "--out", default="docs/bench.png")
    args = parser.parse_args()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for scenario, series, speedup, err, top1 in points(args.json):
        style = dict(marker=MARKERS.get(scenario, "x"), color=COLORS.get(series, "gray"), s=60, alpha=0.8)
        left.scatter(speedup, err, **style)
        right.scatter(speedup, top1, **style)
    left.set(xscale="log", yscale="log", xlabel="prefill speedup vs no reuse",
             ylabel="final hidden-state rel. error (mean; 0 drawn at 1e-9)", title="speed vs hidden-state error")
    right.set(xscale="log", xlabel="prefill speedup vs no reuse", ylabel="next-token top-1 agreement",
              title="speed vs next-token agreement")
    for ax in (left, right):
        ax.set_xticks([0.75, 1, 1.5, 2, 3, 4, 6])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.grid(True, which="major", alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=m, color="black", label=name) for name, m in MARKERS.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=name) for name, c in COLORS.items()]
    right.legend(handles=handles, fontsize=8, loc="lower right", ncol=2)
    fig.suptitle("aecho bench: every request served three ways in one run")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
