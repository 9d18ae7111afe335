"""The HTTP app: KServe's V1/V2 endpoints for the predictor, request limits, metrics, and the web page.

Built in-process from kserve's own pieces (`ModelServer` for the data plane, `RESTServer` for the
routes and error handlers), so that the host is ours to choose (kserve's `ModelServer.start` always
binds 0.0.0.0) and tests can use FastAPI's TestClient on the very same app.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter

from serving.predictor import MaskRCNNPredictor

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
REQUESTS = Counter("maskrcnn_requests_total", "Prediction requests by protocol, HTTP status and model version",
                   ["protocol", "status", "model_version"])


class BodyLimit:
    """ASGI middleware: refuse request bodies above `max_bytes` with 400 before they are read whole.

    The refused upload is still received and thrown away (up to `drain_bytes`) before the answer is
    sent: a server that answers and closes while the client is still sending makes the client's kernel
    see a reset, and a plain client (urllib, requests) then reports "connection reset" instead of the 400.
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(4 * max_bytes, 64 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"request body above the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, too_big, more_body=True)
        seen, more = 0, True

        async def limited():
            nonlocal seen, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge(too_big)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await self._refuse(scope, receive, send, str(exc), more_body=more)

    async def _refuse(self, scope, receive, send, error: str, more_body: bool) -> None:
        drained = 0
        while more_body and drained < self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more_body = message.get("more_body", False)
        await JSONResponse({"error": error}, status_code=400, headers={"connection": "close"})(scope, receive, send)


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


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, no `<!--`, no `&` entity tricks."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(model_name: str, class_names: list[str]) -> str:
    """The web page for this model. Names come from the command line and the package, so they are escaped
    for where they land: HTML text, or JSON inside the page's script."""
    return (PAGE.read_text().replace("{{MODEL_NAME_HTML}}", html.escape(model_name))
            .replace("{{MODEL_NAME_JSON}}", _script_json(model_name)).replace("{{CLASSES_JSON}}", _script_json(class_names)))


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
        return render_page(model.name, model.label_map.names)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, and a NaN or Infinity in it (Python's JSON
        # parser accepts them) then fails to serialise: a 500 for a bad request. Say where and what, not the input.
        detail = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in detail)
        return JSONResponse({"error": f"invalid request body: {summary}", "detail": detail}, status_code=422)

    app.add_middleware(RequestMetrics, model=model)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
