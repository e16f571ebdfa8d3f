"""chatmem: a conversation memory gateway for OpenAI-compatible LLM servers."""

from __future__ import annotations

from .app import create_app, setup
from .config import Config, ConfigError, load_config
from .logs import AccessLogger
from .state import GATEWAY, Gateway

__all__ = [
    "GATEWAY",
    "AccessLogger",
    "Config",
    "ConfigError",
    "Gateway",
    "create_app",
    "load_config",
    "setup",
]
__version__ = "0.1.0"
