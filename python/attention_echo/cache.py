"""The seed's module path ``attention_echo.cache`` (the cache lives in _cache)."""

from ._cache import AttentionEchoCache

__all__ = ["AttentionEchoCache"]
