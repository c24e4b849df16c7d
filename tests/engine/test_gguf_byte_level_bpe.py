"""GGUF files with a byte-level BPE vocabulary ("gpt2": Llama 3, SmolLM,
most models trained with Hugging Face's `tokenizers`), tokenized by aecho
as Hugging Face's `tokenizers` does.

A byte-level BPE of 512 tokens (the 256 bytes, three specials, 253 merges)
is trained with `tokenizers` on the bundled held-out text and written as
the vocabulary of aidreams260K (vocab 512) in GGUF; `aecho tokenize` must
give the ids `tokenizers` gives under each pre-tokenizer aecho implements,
built there from the same pattern (gpt2: ByteLevel's own regex; llama-bpe:
Llama 3's pattern through Split, whole words found in the vocabulary taken
as they are; smollm: every digit alone, then ByteLevel's), on text chosen
for the patterns' corners (contractions, whitespace runs before letters
and at the end, CR/LF, non-ASCII letters, digits and spaces, emoji,
combining marks) and on slices of real text.

Skipped where `gguf`, `tokenizers` or torch is not installed.
"""
import json
import os
import random
import subprocess
import sys

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_engine_vs_torch import ROOT, SHARED, aecho_binary, llama_reference  # noqa: E402
import llama2c_to_gguf  # noqa: E402  (tools/, on the path through test_engine_vs_torch)

AIDREAMS = os.path.join(SHARED, "data", "aidreams260K", "aidreams260K.bin")
HELDOUT = os.path.join(ROOT, "models", "echo-llama-6m", "heldout.txt")
SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORNERS = [
    "Hello world!  It's   fine\n\n\tTabs\r\nCRLF 12345 6789 and 1234567",
    "I'LL say DON'T, we've 'sup y'all 'S 'Re",
    "   leading spaces", "trailing   ", "\n\n\n", " \n \n  x", "a \r\n\r\n b", "x\t\t y",
    "naïve café — “quotes” Ærøskøbing 日本語のテキスト 😀🎉 e\u0301",
    "nbsp\u00a0em\u2003line\u2028para\u2029end\u3000",
    "½ ² Ⅻ १२३ ٤٥٦ x²+y²",
    "def f(x):\n    return x  # comment\n\n\n    \n",
    "((a,b)) == [1, 2] && !x->y; /* c */ 3.14e-10",
    "'", "''", " '", "a'", "'s", "1", " 1", "  ", " ",
]


def vocabulary():
    """The trained vocabulary: (tokens in GPT-2's byte alphabet, merges as
    "left right")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([open(HELDOUT, encoding="utf-8").read()[:300_000]], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for text, i in model["vocab"].items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def reference(tokens, merges, pre):
    """`tokenizers`' own tokenizer for the vocabulary under pre-tokenizer `pre`."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=(pre == "llama-bpe")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    if pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated"), byte_level])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    return tok


@pytest.fixture(scope="module")
def trained():
    return vocabulary()


def write_model(path, tokens, merges, pre, add_bos=False):
    c = llama_reference.load_checkpoint(AIDREAMS, torch.float32)
    assert c.vocab == len(tokens)
    types = [llama2c_to_gguf.CONTROL if t in SPECIALS else llama2c_to_gguf.NORMAL for t in tokens]
    llama2c_to_gguf.write_gguf(path, c, vocabulary=([t.encode() for t in tokens], [0.0] * len(tokens), types),
                               tokenizer_model="gpt2", merges=merges, bos=1, eos=2,
                               metadata=[("tokenizer.ggml.pre", pre), ("tokenizer.ggml.add_bos_token", add_bos)])


def aecho_tokenize(model, text):
    run = subprocess.run([aecho_binary(), "tokenize", "--model", str(model), "--prompt", text],
                         capture_output=True, text=True, check=True)
    line = run.stdout.strip()
    return [int(t) for t in line.split(",")] if line else []


def texts():
    heldout = open(HELDOUT, encoding="utf-8").read()
    rng = random.Random(5)
    slices = []
    for _ in range(12):
        at = rng.randrange(len(heldout) - 2000)
        slices.append(heldout[at:at + rng.randrange(20, 2000)])
    return CORNERS + slices


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "smollm"])
def test_byte_level_vocabulary_encodes_like_tokenizers(pre, trained, tmp_path):
    tokens, merges = trained
    path = tmp_path / "model.gguf"
    write_model(path, tokens, merges, pre)
    want = reference(tokens, merges, pre)
    for text in texts():
        assert aecho_tokenize(path, text) == want.encode(text, add_special_tokens=False).ids, repr(text)


def test_byte_level_prompt_decodes_to_its_text_and_starts_with_bos_when_asked(trained, tmp_path):
    tokens, merges = trained
    path = tmp_path / "model.gguf"
    write_model(path, tokens, merges, "gpt2", add_bos=True)
    text = CORNERS[0] + " " + CORNERS[8]
    ids = aecho_tokenize(path, text)
    assert ids[0] == 1 and ids[1:] == reference(tokens, merges, "gpt2").encode(text, add_special_tokens=False).ids
    # generate echoes the prompt through the tokenizer's decode, then its continuation.
    run = subprocess.run([aecho_binary(), "generate", "--model", str(path), "--prompt", text, "--steps", "1"],
                         capture_output=True, check=True)  # bytes: text mode would turn \r\n into \n
    assert run.stdout.startswith(text.encode()), run.stdout[:200]


def test_unimplemented_pre_tokenizer_and_missing_merges_are_named(trained, tmp_path):
    tokens, merges = trained
    path = tmp_path / "model.gguf"
    write_model(path, tokens, merges, "deepseek-coder")
    run = subprocess.run([aecho_binary(), "tokenize", "--model", str(path), "--prompt", "hi"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "pre-tokenizer 'deepseek-coder'" in run.stderr, run.stderr
    write_model(path, tokens, None, "gpt2")
    run = subprocess.run([aecho_binary(), "tokenize", "--model", str(path), "--prompt", "hi"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "tokenizer.ggml.merges" in run.stderr, run.stderr
