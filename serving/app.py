"""The HTTP app: only the routes we mean to serve, from kserve's own pieces.

- V1: `GET /v1/models`, `GET /v1/models/<name>` (model readiness), `POST /v1/models/<name>:predict`.
- V2 (Open Inference Protocol): `GET /v2` (server metadata), `GET /v2/health/live`, `GET /v2/health/ready`,
  `GET /v2/models`, `GET /v2/models/<name>` (model metadata: the `image` input, the `detections`
  output, the version), `GET /v2/models/<name>/ready`, `POST /v2/models/<name>/infer`.
- `GET /` (liveness, as kserve's), `GET /metrics` (Prometheus), `GET /ui` (the web page).

Not served: kserve's model repository extension (`/v2/repository/.../load|unload`, with which one
anonymous request took a replica out for good), `:explain`, the versioned V2 routes (one version is
served), the OpenAPI pages. Liveness fails when one forward pass runs past `forward_limit_s`, and
readiness (server and model) when it runs past half of that, or while draining after SIGTERM.
kserve's data plane and endpoint handlers do the protocol work; the app is built here, so that the
host is ours to choose (kserve's `ModelServer.start` always binds 0.0.0.0) and tests can use FastAPI's
TestClient on the very same app. A prediction's body is read as a stream (never cached on the request),
parsed (JSON, and for V2 the Open Inference Protocol's schema) and its answer serialised on worker
threads, not on the event loop, so that liveness answers at once while the queue holds the largest bodies.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter, Gauge

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from serving.admission import (CLIENT_LEFT, TICKET, Admission, AdmissionMiddleware, BodyLimit, RequestDropped, drain_budget,
                               prediction_protocol)
from serving.bodies import lift, restore, restore_v2
from serving.limits import ServingLimits
from serving.observe import MODEL, REQUEST_SECONDS

from serving.predictor import MaskRCNNPredictor

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
REQUESTS = Counter("maskrcnn_requests_total", "Prediction requests by protocol, HTTP status and model",
                   ["protocol", "status", *MODEL])


READY = Gauge("maskrcnn_ready", "1 while the predictor is ready (model loaded, not draining, no stuck forward pass)",
              MODEL)


class RequestMetrics:
    """ASGI middleware: count prediction responses by protocol, status and model version, and add
    `x-server-ms` (time inside the server) beside the predictor's `x-forward-ms`."""

    def __init__(self, app, model: MaskRCNNPredictor):
        self.app, self.model = app, model

    async def __call__(self, scope, receive, send):
        protocol = prediction_protocol(scope)
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
            model = self.model.metric_labels
            REQUESTS.labels(protocol, str(status["code"]), *model).inc()
            REQUEST_SECONDS.labels(protocol, str(status["code"]), *model).observe(time.perf_counter() - began)


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, no `<!--`, no `&` entity tricks."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(model_name: str, class_names: list[str]) -> str:
    """The web page for this model. Names come from the command line and the package, so they are escaped
    for where they land: HTML text, or JSON inside the page's script."""
    return (PAGE.read_text().replace("{{MODEL_NAME_HTML}}", html.escape(model_name))
            .replace("{{MODEL_NAME_JSON}}", _script_json(model_name)).replace("{{CLASSES_JSON}}", _script_json(class_names)))


class Health:
    """Liveness and readiness as the predictor's state says: a forward pass stuck past the limit, draining."""

    def __init__(self, model: MaskRCNNPredictor, admission: Admission):
        self.model, self.admission = model, admission

    def live_problem(self) -> str | None:
        return self.model.stuck_problem(ready=False)

    def ready_problem(self) -> str | None:
        if self.admission.draining:
            return "shutting down"
        if not self.model.ready:
            return f"model {self.model.name} is not loaded"
        return self.model.stuck_problem(ready=True)


PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")


async def _parsing(parse: Callable[[], Any]) -> Any:
    """`parse()` on the one parsing thread. JSON parsing holds the GIL for its whole run (25 ms for 26 MB):
    one body at a time, so that the event loop waits for at most one such run, never for a convoy of them."""
    return await asyncio.get_running_loop().run_in_executor(PARSER, parse)


def _decode_v1(dataplane, body: bytes, headers: dict[str, str]) -> tuple[Any, Any]:
    """kserve's decoding of a V1 body (JSON, or a CloudEvent), with its long strings lifted out first
    (`serving.bodies`): the parser holds the GIL for the short rest only."""
    skeleton, lifted = lift(body)
    payload, attributes = dataplane.decode(skeleton, headers)
    if lifted and isinstance(payload, (bytes, bytearray)):  # kserve passed it on unparsed (a non-JSON content
        return dataplane.decode(body, headers)  # type, a CloudEvent whose data is not JSON): the body as sent
    return restore(payload, lifted), attributes


def _parse_v2(model, body: bytes):
    """An Open Inference Protocol body validated as kserve's `InferenceRequest`, its long strings lifted out
    first (`serving.bodies`)."""
    skeleton, lifted = lift(body)
    return restore_v2(model.model_validate_json(skeleton), lifted)


async def _body(request: Request) -> list[bytes]:
    """The request's body as the pieces its stream gave (not kept on the request object, so that it is freed
    with the parsed payload); joined by the worker thread that parses it: copying tens of megabytes is
    itself long enough to delay a probe."""
    return [chunk async for chunk in request.stream()]


async def _json(answer, headers: dict[str, str]) -> Response:
    """An answer (a dict, a pydantic model, or bytes/str as kserve's encode may give) as a JSON response,
    serialised on a worker thread."""
    if isinstance(answer, (bytes, str)):
        return Response(content=answer, headers=headers)
    import orjson

    def dump() -> bytes:
        return answer.model_dump_json(by_alias=True).encode() if hasattr(answer, "model_dump_json") else orjson.dumps(answer)

    return Response(content=await run_in_threadpool(dump), media_type="application/json", headers=headers)


def build_app(model: MaskRCNNPredictor, limits: ServingLimits | None = None) -> FastAPI:
    """The FastAPI app for a (loaded) model: its routes, error handlers and the admission middleware.
    The app's `state.admission` is the queue (its `draining` flag is what SIGTERM sets)."""
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane

    limits = limits or ServingLimits()
    registry = ModelRepository()
    registry.update(model)
    dataplane = DataPlane(model_registry=registry)
    app = FastAPI(title="maskrcnn predictor", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(limits.max_queue, limits.request_timeout_s, limits.retry_after_s,
                          drain_bytes=drain_budget(limits.max_body_bytes), model=model.metric_labels)
    health = Health(model, admission)
    READY.labels(*model.metric_labels).set_function(lambda: float(health.ready_problem() is None))
    app.state.admission = admission
    for path, endpoint, method in [*_info_routes(model, health, dataplane), *_prediction_routes(dataplane)]:
        app.add_api_route(path, endpoint, methods=[method], response_model=None,
                          response_class=HTMLResponse if path == "/ui" else JSONResponse)
    _add_error_handlers(app, limits)
    # outermost last: count every answer, then admit (or 503), then bound the body
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, admission=admission)
    app.add_middleware(RequestMetrics, model=model)
    return app


Route = tuple[str, Callable[..., Any], str]  # path, endpoint, method


def _info_routes(model: MaskRCNNPredictor, health: Health, dataplane) -> list[Route]:
    """Liveness, readiness, metadata, metrics and the web page, as KServe's V1 and V2 protocols name them."""
    from kserve.errors import ModelNotFound
    from kserve.protocol.rest.server import metrics_handler
    from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse

    def named(model_name: str) -> None:
        if model_name != model.name:
            raise ModelNotFound(model_name)

    def unhealthy(problem: str) -> JSONResponse:
        return JSONResponse({"error": problem}, status_code=503)

    async def live():
        problem = health.live_problem()
        return unhealthy(problem) if problem else {"status": "alive"}

    async def v2_live():
        problem = health.live_problem()
        return unhealthy(problem) if problem else {"live": True}

    async def v2_ready():
        problem = health.ready_problem()
        return unhealthy(problem) if problem else {"ready": True}

    async def model_ready(model_name: str):
        named(model_name)
        problem = health.ready_problem()
        return unhealthy(problem) if problem else {"name": model_name, "ready": True}

    async def server_metadata():
        return {"name": "maskrcnn-predictor", "version": dataplane.metadata()["version"], "extensions": []}

    async def models():
        return {"models": [model.name]}

    async def model_metadata(model_name: str):
        named(model_name)
        return ModelMetadataResponse.model_validate(model.metadata())

    async def page() -> str:
        return render_page(model.name, model.label_map.names)

    return [("/", live, "GET"), ("/metrics", metrics_handler, "GET"), ("/ui", page, "GET"),
            ("/v1/models", models, "GET"), ("/v1/models/{model_name}", model_ready, "GET"),
            ("/v2", server_metadata, "GET"), ("/v2/health/live", v2_live, "GET"), ("/v2/health/ready", v2_ready, "GET"),
            ("/v2/models", models, "GET"), ("/v2/models/{model_name}", model_metadata, "GET"),
            ("/v2/models/{model_name}/ready", model_ready, "GET")]


def _prediction_routes(dataplane) -> list[Route]:
    """V1 `:predict` and V2 `/infer`: kserve's handlers, with the body parsed and the answer serialised off
    the event loop."""
    from kserve.errors import ModelNotReady
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from kserve.protocol.rest.v2_endpoints import V2Endpoints
    from pydantic import ValidationError

    v2 = V2Endpoints(dataplane)

    async def v1_predict(model_name: str, request: Request) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        headers = dict(request.headers.items())
        pieces = await _body(request)
        payload, attributes = await _parsing(lambda: _decode_v1(dataplane, b"".join(pieces), headers))
        del pieces
        answer, answer_headers = await dataplane.infer(model_name=model_name, request=payload, headers=headers)
        del payload
        answer, extra = dataplane.encode(model_name=model_name, response=answer, headers=headers, req_attributes=attributes)
        answer_headers.update(extra)
        return await _json(answer, answer_headers)

    async def v2_infer(model_name: str, request: Request, response: Response) -> Response:
        try:
            pieces = await _body(request)
            parsed = await _parsing(lambda: _parse_v2(InferenceRequest, b"".join(pieces)))
            del pieces
        except ValidationError as exc:
            errors = exc.errors(include_input=False)
            raise RequestValidationError([{**e, "loc": ("body", "InferenceRequest", *e["loc"])} for e in errors]) from None
        answer = await v2.infer(request, response, model_name, parsed)
        del parsed
        if isinstance(answer, Response):
            return answer
        return await _json(answer, {k: v for k, v in response.headers.items() if k != "content-length"})

    return [("/v1/models/{model_name}:predict", v1_predict, "POST"), ("/v2/models/{model_name}/infer", v2_infer, "POST")]


def _add_error_handlers(app: FastAPI, limits: ServingLimits) -> None:
    """kserve's handlers for its errors; ours for a dropped request, a client gone before its body was read,
    and a body that fails the schema (named, without echoing it)."""
    from kserve.errors import (InferenceError, InvalidInput, ModelNotFound, ModelNotReady, generic_exception_handler,
                               inference_error_handler, invalid_input_handler, model_not_found_handler,
                               model_not_ready_handler)

    for error, handler in ((InvalidInput, invalid_input_handler), (InferenceError, inference_error_handler),
                           (ModelNotFound, model_not_found_handler), (ModelNotReady, model_not_ready_handler),
                           (Exception, generic_exception_handler)):
        app.add_exception_handler(error, handler)

    @app.exception_handler(RequestDropped)
    async def dropped(request, exc: RequestDropped) -> Response:
        headers = {"retry-after": str(limits.retry_after_s)} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def left_before_its_body_was_read(request, exc: ClientDisconnect) -> Response:
        # uvicorn reports a closed connection before a body it has buffered: a client that sent its whole
        # request and left at once is dropped (client_left) like one that left while its request waited
        ticket = TICKET.get()
        exc = ticket.drop(CLIENT_LEFT) if ticket is not None else RequestDropped(CLIENT_LEFT, "the client left")
        return await dropped(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, and a NaN or Infinity in it (Python's JSON
        # parser accepts them) then fails to serialise: a 500 for a bad request. Say where and what, not the input.
        detail = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in detail)
        return JSONResponse({"error": f"invalid request body: {summary}", "detail": detail}, status_code=422)
