"""EchoConfig: the seed's configuration dataclass, validated by the C++ core.

Defaults are read from the C++ ``EchoConfig`` and validation is the C++
``EchoConfig::validate()`` (its message starts with the field's name), so the
two layers cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from . import _core

_D = _core.EchoConfig()  # the C++ defaults


@dataclass
class EchoConfig:
    """Every knob of the cache: the seed's fields first, ours after.

    Raises ``ValueError`` (the C++ message, starting with the field name) on
    an invalid value, and ``TypeError`` on a value of the wrong type.
    """

    # --- the seed's fields (AttentionEcho 0.1.0) ---
    capacity: int = _D.capacity  #: max cached entries
    similarity_threshold: float = _D.similarity_threshold  #: cosine similarity for an echo hit
    max_prefix_length: int = _D.max_prefix_length  #: longer prefixes cache their first rows only
    adjustment_strength: float = _D.adjustment_strength  #: alpha of the dense tier's Taylor step
    enable_jacobian: bool = _D.enable_jacobian  #: dense tier: apply the Taylor step
    hash_dim: int = _D.hash_dim  #: semantic key dimension
    eviction_policy: str = _D.eviction_policy  #: "lru" or "lfu"
    per_layer: bool = _D.per_layer  #: layer id is part of the key space

    # --- ours ---
    max_bytes: int = _D.max_bytes  #: hard limit on stored host bytes (keys, tokens, host payloads)
    mode: str = _D.mode  #: approximate tier: "off", "sparse" or "dense" ("exact" is accepted for "off")
    max_error: float = _D.max_error  #: guard: max relative L2 error (inf = off)
    verify_rows: int = _D.verify_rows  #: guard: exact rows checked per head
    length_tolerance: float = _D.length_tolerance  #: |p - p_c| <= tol * p_c for an echo hit
    threads: int = _D.threads  #: 0 = all hardware threads
    sparse_mass: float = _D.sparse_mass  #: sparse tier: attention mass the kept tiles cover
    block_size: int = _D.block_size  #: sparse tier tile edge: 32, 64 or 128 (CUDA: 64 or 128)
    store_url: str = _D.store_url  #: shared L2 store: "" or "redis://HOST:PORT[?deadline_ms=3&...]"
    device_max_bytes: int = _D.device_max_bytes  #: the same limit per CUDA device, for payloads kept there

    def __post_init__(self) -> None:
        self._to_core()

    def _to_core(self) -> "_core.EchoConfig":
        """The validated C++ config (raises ValueError/TypeError naming the field)."""
        core = _core.EchoConfig()
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                setattr(core, f.name, value)
            except TypeError:
                raise TypeError(
                    f"{f.name} must be of type {f.type}, got {type(value).__name__} ({value!r})"
                ) from None
        core.validate()
        return core


del _D  # no _core instance may outlive the interpreter's shutdown (nanobind checks)
