"""Argument conversion shared by the cache, the request and the torch layer.

NumPy arrays and PyTorch tensors become float32 CPU arrays whose last
dimension is contiguous (contiguous float32 inputs, and any other strides with
a unit last stride, pass without a copy); outputs are converted back to the
caller's dtype and device. Where the cache takes them (``device=True``), CUDA
tensors stay on their device in their own dtype (float16 or bfloat16; the core
refuses others), so q, k and v never travel to the host. Types and ranks are checked here, naming the
argument; checks on shapes and values happen in C++.
"""

from __future__ import annotations

import operator
import sys
from typing import Optional

import numpy as np

_INT32 = np.iinfo(np.int32)


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # never import torch just to check a type
    return torch.Tensor if torch is not None else None


def heads_in(x, name: str, device: bool = False):
    """``x`` as a float32 CPU array (NumPy or torch) with a unit last stride;
    with ``device``, a CUDA tensor as ``cuda_heads`` makes it."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{name} must have shape (T, D) or (H, T, D), got shape {x.shape}")
        if x.dtype != np.float32 or not x.flags.aligned or (x.shape[-1] > 1 and x.strides[-1] != 4):
            x = np.ascontiguousarray(x, dtype=np.float32)
        return x
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (T, D) or (H, T, D), got shape {tuple(x.shape)}")
        return cuda_heads(x) if device and x.is_cuda else torch_f32(x)
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def qkv_in(query, key, value, device: bool = False):
    return heads_in(query, "query", device), heads_in(key, "key", device), heads_in(value, "value", device)


def cuda_heads(x):
    """A CUDA tensor as the CUDA kernels load it: detached, in its own dtype
    and device, with a unit last stride, 16-byte aligned and strides of 8
    elements, none 0 (a copy only where it is not, e.g. an odd slice or an
    expand()ed kv head)."""
    import torch

    x = x.detach()
    broadcast = any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape))
    if x.stride(-1) != 1 or x.data_ptr() % 16 or any(s % 8 for s in x.stride()[:-1]) or broadcast:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def stream_of(x) -> int:
    """The cudaStream_t a call on ``x`` runs on: torch's current stream of
    x's device for a CUDA tensor (so the call is ordered with the caller's
    kernels), 0 for host arrays."""
    if not getattr(x, "is_cuda", False):
        return 0
    import torch

    return torch.cuda.current_stream(x.device).cuda_stream


def torch_f32(x):
    """A torch tensor as a detached float32 CPU tensor with a unit last stride
    (no copy when it already is one)."""
    import torch

    x = x.detach()
    if x.device.type != "cpu" or x.dtype != torch.float32:
        x = x.to(device="cpu", dtype=torch.float32)
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def matrix_in(x, name: str):
    """``x`` ((rows, cols) or (cols,)) as a C-contiguous float32 CPU matrix."""
    if x is None:
        return None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if x.dim() == 1:
            x = x.reshape(1, -1)
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (P, E) or (E,), got shape {tuple(x.shape)}")
        return x
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (P, E) or (E,), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def tokens_in(x, name: str = "prefix_tokens"):
    """Token ids (sequence, ndarray or tensor) as a contiguous int32 array."""
    if x is None:
        return None
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"{name} must be a sequence of integers, got {type(x).__name__}")
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.min() < _INT32.min or a.max() > _INT32.max:
        raise ValueError(f"{name} values must fit in int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def int_in(x, name: str) -> int:
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if not _INT32.min <= value <= _INT32.max:
        raise ValueError(f"{name} must fit in int32, got {value}")
    return value


def namespace_in(x) -> str:
    if not isinstance(x, str):
        raise TypeError(f"namespace must be a str, got {type(x).__name__}")
    return x


def scale_in(x) -> Optional[float]:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a number or None, got {type(x).__name__}") from None


def empty_like(x):
    """A float32 host output for a prepared input, or for a CUDA tensor one of
    its dtype on its device."""
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, dtype=np.float32)
    import torch

    if x.is_cuda:
        return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    return torch.empty(tuple(x.shape), dtype=torch.float32)


def restore(out, like):
    """``out`` in the dtype and device of the caller's ``like`` (no copy when
    it already is: a CUDA output)."""
    if isinstance(like, np.ndarray):
        return out if like.dtype == np.float32 else out.astype(like.dtype)
    return out.to(device=like.device, dtype=like.dtype)
