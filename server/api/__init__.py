"""The HTTP API under /v1, split as the FastAPI template does: `routes` (thin), `schemas` (bodies), `deps`."""

from server.api.routes import router

__all__ = ["router"]
