"""Hugging Face transformers integration: the attention implementation "echo".

Importing this module registers ``"echo"`` with transformers'
``AttentionInterface`` (and the matching mask function), so a Llama-family
model runs its attention through AttentionEcho::

    import attention_echo.hf as echo_hf
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="echo")
    # or: model.set_attn_implementation("echo"); or LlamaForCausalLM(config) with
    #     config._attn_implementation = "echo"
    echo_hf.enable(model, EchoConfig(capacity=256))      # optional: choose the config

    with torch.no_grad(), echo_hf.echo_context(prefix_length=128, prefix_tokens=ids[0, :128]):
        logits = model(ids).logits
    echo_hf.stats(model)                                  # hits/misses summed over layers

How the request maps onto the cache:

* **One cache per attention layer** (``module.layer_idx``), attached to the
  attention module; ``enable()`` sets their config (default: ``EchoConfig()``).
* **Prefix length**: from ``echo_context(prefix_length=...)`` or the forward
  kwarg ``echo_prefix_length=`` (transformers passes extra kwargs down to the
  attention function). If neither is set, the prefix is ``len(prefix_tokens)``
  when tokens are given, else the whole prompt.
* **Prefix embeddings** (the semantic key): the mean of the layer's own
  values over the prefix, see ``_prefix_embeddings``.
* **Prefix tokens** (exact tier): ``echo_context(prefix_tokens=...)`` or
  ``echo_prefix_tokens=``; (P,) shared by the batch or (B, P).
* **Namespace**: ``echo_context(namespace=...)`` / ``echo_namespace=``.

* **Padding** (batched prompts of different lengths, as ``generate()`` passes
  them): when the mask is causal attention over one contiguous run of real
  tokens per sequence (left or right padding), each sequence is served on its
  own tokens: positions, the prefix and ``prefix_tokens`` count from its first
  real token. The padding query rows are computed by SDPA with their mask
  rows, as ``"sdpa"`` computes them.

On CUDA (a build with AE_CUDA) float16/bfloat16 layers with head dim 64 or
128 stay on the device: q, k and v go to the kernels as they are, the output
is a CUDA tensor, the cache keeps its payloads in device memory, and only the
prefix embeddings' (1, Hkv * head_dim) mean goes to the host for the
semantic key.

Falls back to transformers' own SDPA attention (same result as
``attn_implementation="sdpa"``) when the cache cannot serve the call: any
other attention mask, decode steps or chunks whose query length
differs from the key length (KV cache), dropout, softcapping, sliding windows,
attention sinks, non-causal layers, CUDA layers of another dtype or head dim,
and calls that need gradients (the echo path is inference-only; a UserWarning
says so once).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ._cache import AttentionEchoCache
from ._config import EchoConfig
from ._request import EchoRequest, _is_token_batch, _split
from .torch import _echo_batch, _merge_meta

__all__ = ["register", "enable", "echo_context", "caches", "stats", "clear", "last_meta", "NAME"]

NAME = "echo"

_CONTEXT: contextvars.ContextVar[Dict[str, Any]] = contextvars.ContextVar("attention_echo_hf", default={})
_LOCK = threading.Lock()
_warned_grad = False


def register(name: str = NAME) -> None:
    """Register the echo attention function (and SDPA's mask builder, so
    padding masks still reach it) under ``name``. Idempotent."""
    from transformers import AttentionInterface

    # transformers >= 4.53 builds masks per implementation: with SDPA's builder
    # a plain causal batch gets no mask (the echo path) and padding gets one
    # (the SDPA fallback). Older releases always pass a full mask.
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, echo_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


@contextlib.contextmanager
def echo_context(
    prefix_length: Optional[int] = None,
    prefix_tokens=None,
    namespace: Optional[str] = None,
) -> Iterator[None]:
    """Per-call echo parameters for every layer run inside the block
    (thread- and asyncio-local)."""
    values = dict(_CONTEXT.get())
    if prefix_length is not None:
        values["prefix_length"] = prefix_length
    if prefix_tokens is not None:
        values["prefix_tokens"] = prefix_tokens
    if namespace is not None:
        values["namespace"] = namespace
    token = _CONTEXT.set(values)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def enable(model: torch.nn.Module, config: Optional[EchoConfig] = None, set_implementation: bool = True):
    """Give every attention layer of ``model`` a fresh cache with ``config``
    and (by default) switch the model to ``attn_implementation="echo"``."""
    config = config or EchoConfig()
    for module in _attention_modules(model):
        module._echo_cache = AttentionEchoCache(config)
    if set_implementation:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
        else:  # older transformers
            model.config._attn_implementation = NAME
    return model


def _cache_of(module: torch.nn.Module) -> AttentionEchoCache:
    cache = getattr(module, "_echo_cache", None)
    if cache is None:
        with _LOCK:
            cache = getattr(module, "_echo_cache", None)
            if cache is None:
                cache = module._echo_cache = AttentionEchoCache(EchoConfig())
    return cache


def caches(model: torch.nn.Module) -> Dict[int, AttentionEchoCache]:
    """The per-layer caches created so far, by layer index."""
    return {m.layer_idx: m._echo_cache for m in _attention_modules(model) if getattr(m, "_echo_cache", None) is not None}


def stats(model: torch.nn.Module) -> Dict[str, Any]:
    """Stats summed over the layers' caches (hit_rate recomputed)."""
    total: Dict[str, Any] = {}
    for cache in caches(model).values():
        for key, value in cache.stats.items():
            if key != "hit_rate":
                total[key] = total.get(key, 0) + value
    lookups = total.get("total_lookups", 0)
    total["hit_rate"] = total.get("hits", 0) / lookups if lookups else 0.0
    total["layers"] = len(caches(model))
    return total


def clear(model: torch.nn.Module) -> None:
    for cache in caches(model).values():
        cache.clear()


def last_meta(model: torch.nn.Module) -> Dict[int, Dict[str, Any]]:
    """Metadata of each layer's most recent echo call (for inspection)."""
    return {m.layer_idx: m._echo_last_meta for m in _attention_modules(model) if hasattr(m, "_echo_last_meta")}


def _can_echo(module, query, key, dropout, kwargs) -> bool:
    if dropout > 0.0:
        return False
    # The CUDA kernels take float16/bfloat16 and head dims 64 and 128; other CUDA layers stay on SDPA.
    if query.is_cuda and (query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] not in (64, 128)):
        return False
    if query.shape[2] != key.shape[2]:  # decode step / chunked prefill against a KV cache
        return False
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return False
    for name in ("softcap", "sliding_window", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        global _warned_grad
        if not _warned_grad:
            warnings.warn(
                "attention_echo.hf: the echo attention is inference-only; with gradients enabled it "
                "falls back to SDPA. Use torch.no_grad() or torch.inference_mode() for inference.",
                UserWarning,
                stacklevel=4,
            )
            _warned_grad = True
        return False
    return True


def _padded_spans(attention_mask: torch.Tensor, tokens: int) -> Optional[List[tuple]]:
    """Per sequence the [start, end) of its real tokens when the (B, 1, T, T)
    mask (bool, or additive with 0 where allowed) is exactly causal attention
    over one contiguous run of real tokens for those rows; None for any other
    mask."""
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-2:] != (tokens, tokens):
        return None
    allowed = (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)[:, 0]
    keys = allowed[:, -1]  # the last query (real or padding) sees every real key
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=allowed.device).tril()
    spans = []
    for b in range(allowed.shape[0]):
        real = keys[b].nonzero()
        if len(real) == 0:
            return None
        start, end = int(real[0]), int(real[-1]) + 1
        if not bool(keys[b, start:end].all()):
            return None
        if not torch.equal(allowed[b, start:end], causal[start:end] & keys[b]):
            return None
        spans.append((start, end))
    return spans


def _prefix_length(prefix_length: Optional[int], prefix_tokens, tokens: int) -> int:
    """The prefix asked for (clipped to the ``tokens`` of this call); when
    none is, the length of ``prefix_tokens`` ((P,) or (B, P)), else the whole
    prompt."""
    if prefix_length is None:
        if prefix_tokens is None:
            return tokens
        prefix_length = len(prefix_tokens[0] if getattr(prefix_tokens, "ndim", 1) == 2 else prefix_tokens)
    return min(int(prefix_length), tokens)


def _prefix_embeddings(value: torch.Tensor, prefix_length: int) -> Optional[torch.Tensor]:
    """The prefix embeddings of the Hugging Face integration: the mean over
    the prefix positions of the layer's own values, flattened over kv heads,
    one (1, Hkv * head_dim) row per sequence: (B, 1, Hkv * head_dim) from
    (B, Hkv, T, head_dim) ``value``. None without a prefix.

    Hidden states are not visible to an attention function; keys and values
    are, and both depend on the prefix through this layer's weights. Values
    carry content without RoPE's positional part: on the project's trained
    model (echo-llama-6m, 896-token prefixes) the key means of unrelated
    documents had cosine 0.92-0.997 (everything would look similar), value
    means 0.02-0.86, and 0.997+ for a near-duplicate. Mean-pooling is what
    the key computation does first anyway, so passing the mean loses nothing.
    """
    if prefix_length <= 0:
        return None
    return value[:, :, :prefix_length].detach().float().mean(dim=2).reshape(value.shape[0], 1, -1)


def echo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """transformers attention function: query (B, H, T, D), key/value
    (B, Hkv, T, D); returns ((B, T, H, D) output, None)."""
    ctx = _CONTEXT.get()
    prefix_length = kwargs.pop("echo_prefix_length", ctx.get("prefix_length"))
    prefix_tokens = kwargs.pop("echo_prefix_tokens", ctx.get("prefix_tokens"))
    namespace = kwargs.pop("echo_namespace", ctx.get("namespace", ""))

    spans = None if attention_mask is None else _padded_spans(attention_mask, query.shape[2])
    if (attention_mask is not None and spans is None) or not _can_echo(module, query, key, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    fields = dict(layer_id=getattr(module, "layer_idx", 0) or 0, scale=scaling, causal=True, namespace=namespace)
    cache = _cache_of(module)
    if spans is None or all(span == (0, query.shape[2]) for span in spans):
        prefix_length = _prefix_length(prefix_length, prefix_tokens, query.shape[2])
        requests = EchoRequest.per_sequence(
            query.shape[0], _prefix_embeddings(value, prefix_length), prefix_tokens,
            prefix_length=prefix_length, **fields
        )
        out, meta = _echo_batch(cache, query, key, value, requests)
    else:
        out, meta = _echo_padded(module, cache, query, key, value, attention_mask, spans,
                                 prefix_length, prefix_tokens, fields, **kwargs)
    module._echo_last_meta = meta
    return out, None


def _echo_padded(module, cache, query, key, value, attention_mask, spans, prefix_length, prefix_tokens, fields,
                 **kwargs):
    """A padded batch one sequence at a time on its real tokens [start, end);
    the padding query rows go through SDPA with their own mask rows."""
    batch, heads, tokens, dim = query.shape
    out = torch.empty(batch, tokens, heads, dim, dtype=query.dtype, device=query.device)
    tokens_of = _split(prefix_tokens, batch, _is_token_batch(prefix_tokens), "prefix_tokens")
    metas = []
    for b, (start, end) in enumerate(spans):
        q, k, v = (x[b : b + 1, :, start:end] for x in (query, key, value))
        length = _prefix_length(prefix_length, tokens_of[b], end - start)
        embeddings = _prefix_embeddings(v, length)
        request = EchoRequest(prefix_length=length, prefix_embeddings=None if embeddings is None else embeddings[0],
                              prefix_tokens=tokens_of[b], **fields)
        rows, meta = _echo_batch(cache, q, k, v, [request])
        out[b, start:end] = rows[0]
        metas.append(meta)
        for first, last in ((0, start), (end, tokens)):
            if first < last:
                pad, _ = sdpa_attention_forward(
                    module, query[b : b + 1, :, first:last], key[b : b + 1], value[b : b + 1],
                    attention_mask[b : b + 1, :, first:last], scaling=fields["scale"], **kwargs
                )
                out[b, first:last] = pad[0]
    return out, _merge_meta(metas)


register()
