"""The seed's module path ``attention_echo.config`` (EchoConfig lives in _config)."""

from ._config import EchoConfig

__all__ = ["EchoConfig"]
