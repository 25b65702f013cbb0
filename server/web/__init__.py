"""The search page that `concord serve` serves at `/`: it encodes the query photo in the browser with the edge
model's ONNX file (onnxruntime-web, WebAssembly) and the manifest's preprocessing, and sends only the
embedding. Every asset comes from the server itself (no CDN); `router` holds its routes."""

from server.web.routes import router

__all__ = ["router"]
