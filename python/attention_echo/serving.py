"""A Llama model (llama2.c ``.bin`` or GGUF) prefilled through the C++ serving
planner: exact prefix reuse, the KV-blend tier for similar prompts, and a
report of what each prompt reused and the guard's error estimate::

    from attention_echo.serving import LlamaServer
    server = LlamaServer("models/echo-llama-6m/model.bin")
    logits, report = server.prefill(tokens)           # next-token logits, (vocab,)
    report["route"], report["reused"], report["estimated_error"]
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from . import _core
from ._convert import namespace_in

__all__ = ["LlamaServer"]


class LlamaServer:
    """One model, one planner (its K/V store) and one engine; not thread-safe.

    ``blend``: reuse a similar stored prompt's K/V (CacheBlend's idea) where
    the planner's cost model says it pays; ``recompute_ratio`` of the aligned
    rows are recomputed in every layer (``blend_selection``: ``"run-start"``,
    those nearest the start of their aligned run; ``"deviation"``,
    CacheBlend's, layer 0 over every row and then those whose K/V deviate
    most; ``"auto"``, run start unless passages moved), and a blend whose K/V deviation or error
    estimate (the deviation times the square root of the next-token entropy)
    exceeds its bound is computed exactly instead: ``max_error``, lowered at
    run time by calibration on the next token's KL (the estimate) and on the
    mean KL over the prompt's last rows (the deviation).

    ``store_bytes`` bounds the K/V store; ``reserve_bytes`` of it (at most
    ``store_bytes``) is written in at construction, as a server takes its
    K/V memory at startup, so that requests do not pay for the process
    growing into memory it never held.

    ``store_url`` (``"redis://HOST:PORT[?deadline_ms=3&...]"``) shares the
    exact K/V blocks every replica of this model computes through a Redis
    server: a prompt whose stored prefix ends early here reads the blocks
    that follow from there (``report["reused_from_l2"]`` rows), each
    checked, within the lookup deadline; blended K/V never leave the
    process. ``l2_stats`` counts what the store did.
    """

    def __init__(self, path: str, *, threads: int = 0, blend: bool = True, recompute_ratio: float = 0.15,
                 max_error: float = 0.2, store_bytes: int = 512 << 20, reserve_bytes: int = 0,
                 blend_selection: str = "auto", store_url: str = "") -> None:
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__}")
        for name, value in (("threads", threads), ("store_bytes", store_bytes), ("reserve_bytes", reserve_bytes)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        for name, value in (("blend_selection", blend_selection), ("store_url", store_url)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        self._server = _core.LlamaServer(path, threads, bool(blend), float(recompute_ratio), float(max_error),
                                         store_bytes, reserve_bytes, blend_selection, store_url)

    @property
    def vocab_size(self) -> int:
        return self._server.vocab_size

    @property
    def context_length(self) -> int:
        return self._server.context_length

    @property
    def stored_prompts(self) -> int:
        return self._server.stored_prompts

    @property
    def l2_stats(self) -> dict:
        """The shared store's counters (``store_url``; zeros without one):
        lookups, hits, misses, rejected, timeouts, errors, writes, ..."""
        return self._server.l2_stats()

    def clear(self, namespace: str) -> None:
        """Drops one namespace's stored K/V (a tenant leaving); the others keep theirs."""
        self._server.clear_namespace(namespace_in(namespace))

    def prefill(self, tokens: Sequence[int], namespace: str = "") -> Tuple[np.ndarray, dict]:
        """Prefills ``tokens`` (ids in the vocabulary, 1 to context_length of
        them) and returns the last row's next-token logits and the reuse
        report. Prompts never reuse work across namespaces."""
        namespace = namespace_in(namespace)
        return self._server.prefill(_token_array(tokens, "tokens"), namespace)

    def tokenize(self, text: str) -> np.ndarray:
        """``text`` as the model reads a prompt (int32 ids, BOS first where its
        vocabulary adds one), with the model's own tokenizer: a GGUF file's
        vocabulary (SentencePiece or byte-level BPE), else ``tokenizer.bin``
        beside the model. ValueError when the model has none."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._server.tokenize(text)

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (BOS, EOS and control tokens read as
        nothing; bytes that are not UTF-8 as U+FFFD)."""
        return self._server.decode(_token_array(tokens, "tokens")).decode("utf-8", errors="replace")

    def calibrate(self, passages: Sequence[Sequence[int]]) -> List[dict]:
        """Calibrates the blend guard before serving, from ``passages`` of the
        workload's text (a shared head first, then at least two more; 128
        tokens or more in all): blends of them in another order, with an
        edit and with an insertion, each also computed exactly. Returns each
        blend's guard estimate and measured next-token KL (nats), and its K/V
        deviation and measured mean KL over the prompt's last rows."""
        if isinstance(passages, (str, bytes)) or not isinstance(passages, Sequence):
            raise TypeError(f"passages must be a sequence of token sequences, got {type(passages).__name__}")
        arrays = [_token_array(p, "passages") for p in passages]
        return self._server.calibrate([a.tolist() for a in arrays])


def _token_array(tokens: Sequence[int], name: str) -> np.ndarray:
    """``tokens`` as a contiguous int32 array; TypeError/ValueError naming
    ``name`` for what the core cannot take (the core checks the vocabulary)."""
    array = np.asarray(tokens)
    if array.size and array.dtype.kind not in "iu":  # [] is float64 to NumPy; the core names it empty
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name}: id is outside the vocabulary")
    return np.ascontiguousarray(array, dtype=np.int32)
