"""The HTTP app: KServe's V1/V2 endpoints for the predictor, request limits, metrics, and the web page.

Built in-process from kserve's own pieces (`ModelServer` for the data plane, `RESTServer` for the
routes and error handlers), so that the host is ours to choose (kserve's `ModelServer.start` always
binds 0.0.0.0) and tests can use FastAPI's TestClient on the very same app.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter

from serving.predictor import MaskRCNNPredictor

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
REQUESTS = Counter("maskrcnn_requests_total", "Prediction requests by protocol, HTTP status and model version",
                   ["protocol", "status", "model_version"])


class BodyLimit:
    """ASGI middleware: refuse request bodies above `max_bytes` with 400 before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"request body above the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"error": too_big}, status_code=400)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(too_big)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await JSONResponse({"error": str(exc)}, status_code=400)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class RequestMetrics:
    """ASGI middleware: count prediction responses by protocol, status and model version, and add
    `x-server-ms` (time inside the server) beside the predictor's `x-forward-ms`."""

    def __init__(self, app, model: MaskRCNNPredictor):
        self.app, self.model = app, model

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        protocol = "v1" if path.endswith(":predict") else "v2" if path.endswith("/infer") else None
        if protocol is None:
            return await self.app(scope, receive, send)
        status = {"code": 500}
        began = time.perf_counter()

        async def record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                # time inside this server, from the request's arrival to the response's start
                server_ms = f"{(time.perf_counter() - began) * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-server-ms", server_ms)]}
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            REQUESTS.labels(protocol, str(status["code"]), self.model.version or "unknown").inc()


def build_app(model: MaskRCNNPredictor, max_body_bytes: int = 32 << 20) -> FastAPI:
    """Register the (loaded) model with kserve's data plane and return the FastAPI app."""
    import kserve.model_server as kms
    from kserve.protocol.rest.server import RESTServer

    server = kms.ModelServer(enable_grpc=False, workers=1)
    server.register_model(model)
    rest = RESTServer(kms.FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, http_port=0)
    rest.create_application()
    app: FastAPI = kms.app

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text().replace("{{MODEL_NAME}}", model.name).replace(
            "{{CLASSES}}", json.dumps(model.label_map.names))

    app.add_middleware(RequestMetrics, model=model)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
