"""The OpenAI-compatible HTTP server: `protocol` (wire format), `serving` (OpenAI semantics over an
Engine), `app` (FastAPI routes, auth, errors, metrics; `serve`, `start_test_server`)."""

from __future__ import annotations

from lagoon.engine.server.app import create_app, serve, start_test_server

__all__ = ["create_app", "serve", "start_test_server"]
