"""`m3jax serve`: an OpenAI-compatible HTTP server over the Engine (see app.py)."""

from m3jax.serve.app import create_app
from m3jax.chat import ChatTemplate

__all__ = ["ChatTemplate", "create_app"]
