"""GGUF files written by the official `gguf` package (llama.cpp's gguf-py) load
in the engine and give the logits of the llama2.c checkpoint they came from:
bit-identical for F32 tensors, within F16 rounding for F16 ones.

Skipped where `gguf` is not installed. The C++ suite has its own GGUF writer
(tests/test_engine.cpp); this test checks the reader against the reference
writer's layout (alignment, metadata types, dimension order).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_engine_vs_torch import SHARED, aecho_binary, llama_reference  # noqa: E402
import llama2c_to_gguf  # noqa: E402  (tools/, on the path through test_engine_vs_torch)

MODEL = os.path.join(SHARED, "data", "aidreams260K", "aidreams260K.bin")
TOKENS = "1,34,300,5,77,411,13,256,2,99,140,7,450,61,3,222"


def logits(model, tmp_path, vocab):
    out = tmp_path / "logits.f32"
    subprocess.run([aecho_binary(), "logits", "--model", str(model), "--tokens", TOKENS, "--out", str(out)],
                   check=True)
    return np.fromfile(out, dtype="<f4").reshape(-1, vocab)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_official_gguf_matches_llama2c(dtype, tmp_path):
    import torch
    c = llama_reference.load_checkpoint(MODEL, torch.float32)
    path = tmp_path / "model.gguf"
    llama2c_to_gguf.write_gguf(path, c, gguf.GGMLQuantizationType.F32 if dtype == np.float32
                               else gguf.GGMLQuantizationType.F16)
    want = logits(MODEL, tmp_path, c.vocab)
    got = logits(path, tmp_path, c.vocab)
    if dtype == np.float32:
        assert np.array_equal(got, want)
    else:
        assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) < 1e-2
