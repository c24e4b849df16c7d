"""`aecho bench` end to end on the small aidreams checkpoint: every scenario
runs, the table and the JSON carry every mode and metric, bad options are
usage errors (exit 2)."""
import math
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_engine_vs_torch import ROOT, SHARED, aecho_binary  # noqa: E402

AIDREAMS = os.path.join(SHARED, "data", "aidreams260K")
HELDOUT = os.path.join(ROOT, "models", "echo-llama-6m", "heldout.txt")


def bench(*args):
    cmd = [aecho_binary(), "bench", "--model", os.path.join(AIDREAMS, "aidreams260K.bin"),
           "--tokenizer", os.path.join(AIDREAMS, "tok512.bin"), "--heldout", HELDOUT, *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(not os.path.exists(HELDOUT), reason="no bundled held-out text")
def test_all_scenarios_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    r = bench("--scenario", "all", "--requests", "3", "--threads", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    names = ["chatbot", "rag", "code", "near-dup", "rag-shuffled", "chat-edit"]
    for name in names:
        assert "== " + name in r.stdout
    assert "3/3" in r.stderr  # the progress bar
    doc = json.loads(out.read_text())
    assert doc["context"] == 128 and doc["threads"] == 2 and doc["repeats"] == 3
    assert doc["blend_selection"] == "auto"
    # Every figure carries the machine it was measured on, and when.
    assert doc["machine"]["cpu"] and doc["machine"]["hardware_threads"] >= 1
    assert doc["started_utc"].endswith("Z")
    assert [s["scenario"] for s in doc["scenarios"]] == names
    for s in doc["scenarios"]:
        assert set(s["modes"]) == {"none", "exact-prefix", "echo"}
        for m in s["modes"].values():
            hits = m["hit_rate"]
            assert abs(sum(hits[k] for k in ("exact", "partial", "sparse", "dense", "miss")) - 1) < 1e-6
            for key in ("prefill_ms_mean", "prefill_speedup", "attention_share", "top1_agreement",
                        "kl_mean", "perplexity_change", "hidden_rel_error_mean"):
                assert key in m
        assert s["modes"]["exact-prefix"]["hidden_rel_error_max"] == 0
        echo = s["modes"]["echo"]
        detail = echo["requests_detail"]  # every request: route, rows reused, estimate vs measured
        assert len(detail) == 3
        assert echo["routed_skip"] + echo["routed_blend"] + echo["routed_cache"] == 3
        for q in detail:
            assert q["route"] in ("reuse", "blend", "cache")
            assert q["estimated_error"] >= 0 and q["hidden_rel_error"] >= 0
            assert math.isfinite(q["nll_change"])
            assert q["calibration_kl"] >= 0 and q["calibration_continuation_kl"] >= 0
            guard = ("blend_deviation", "guard_estimate_bound", "guard_deviation_bound", "blend_refused_at_layer")
            if q["route"] != "blend":
                assert all(q[k] is None for k in guard)
            elif q["blend_rejected"]:  # refused where it was past a bound
                assert q["blend_refused_at_layer"] >= 1
            else:
                assert q["blend_refused_at_layer"] == -1
                assert q["blend_deviation"] <= q["guard_deviation_bound"]
                assert q["estimated_error"] <= q["guard_estimate_bound"]
            assert 0 <= q["repeats_on_another_route"] <= 2  # of the two later stacks
        assert echo["repeats_on_another_route"] == sum(q["repeats_on_another_route"] for q in detail)
        exact = s["modes"]["exact-prefix"]["requests_detail"]  # side by side with echo's
        assert [q["tokens"] for q in exact] == [q["tokens"] for q in detail]
        assert all(q["route"] == "reuse" and q["kl"] == 0 and q["prefill_ms"] > 0 for q in exact)


@pytest.mark.parametrize("args", [["--scenario", "chat"], ["--scenario", "rag", "--mode", "fast"],
                                  ["--scenario", "rag", "--requests", "0"], ["--scenario", "rag", "--bogus", "1"],
                                  ["--scenario", "rag", "--sparse-mass", "2"], ["--scenario", "rag", "--max-error", "x"],
                                  ["--scenario", "rag", "--recompute-ratio", "2"],
                                  ["--scenario", "rag", "--blend-selection", "hkvd"],
                                  ["--scenario", "rag", "--blend-max-error", "-1"],
                                  ["--scenario", "rag", "--blend-max-kl", "0"],
                                  ["--scenario", "rag", "--blend-max-continuation-kl", "-1"],
                                  ["--scenario", "rag", "--repeats", "0"],
                                  ["--scenario", "rag", "--store", "redis://127.0.0.1:1", "--repeats", "2"]])
def test_bad_options_are_usage_errors(args):
    r = bench(*args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_missing_heldout_names_the_option(tmp_path):
    """A model without heldout.txt beside it (models/echo-llama-doc ships
    none) needs --heldout, and the error says so before any work."""
    model = os.path.join(ROOT, "models", "echo-llama-doc", "model.q8_0.gguf")
    r = subprocess.run([aecho_binary(), "bench", "--scenario", "rag", "--model", model], capture_output=True, text=True)
    assert r.returncode == 2 and "--heldout" in r.stderr and "no held-out text beside the model" in r.stderr
    r = subprocess.run([aecho_binary(), "bench", "--scenario", "rag", "--heldout", str(tmp_path / "none.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "none.txt does not exist" in r.stderr


def test_a_one_layer_model_is_served_without_blends(tmp_path):
    """A blend reuses K/V from layer 1 on, so a one-layer model cannot
    blend: aecho bench skips its calibration and serves it by exact prefix
    reuse (it had stopped at calibrate()'s blend)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    import llama2c_to_gguf  # tools/, on the path through test_engine_vs_torch
    from test_engine_vs_torch import llama_reference
    c = llama_reference.load_checkpoint(os.path.join(ROOT, "models", "echo-llama-6m", "model.bin"), torch.float32)
    model = tmp_path / "one_layer.gguf"
    llama2c_to_gguf.write_gguf(model, c, layers=1)
    out = tmp_path / "bench.json"
    r = subprocess.run([aecho_binary(), "bench", "--scenario", "near-dup", "--model", str(model), "--tokenizer",
                        os.path.join(ROOT, "models", "echo-llama-6m", "tokenizer.bin"), "--heldout", HELDOUT,
                        "--context", "512", "--requests", "4", "--repeats", "1", "--threads", "2", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert not doc["blend_calibration"]["ran"]
    assert doc["scenarios"][0]["modes"]["echo"]["routed_blend"] == 0
