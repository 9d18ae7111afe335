"""A stand-in for the Kubeflow Pipelines API server (it cannot run here: it needs a cluster, MySQL and
Argo), serving on 127.0.0.1 the v2beta1 REST calls the real `kfp.Client` makes to upload pipelines and
versions and to start runs and recurring runs. What it reproduces of the real server was read from its
source (`backend/src/apiserver/server/pipeline_upload_server.go` and the v2beta1 API):

- `POST /pipelines/upload` (multipart `uploadfile`, `?name=`): creates a pipeline *and* its first
  version, both named `name`; a pipeline of that name already there: 409.
- `POST /pipelines/upload_version` (`?name=&pipelineid=`): a version under the pipeline; no
  `pipelineid`: 400; a version of that name already in the pipeline: 409; an unknown pipeline: 400.
- `GET /pipelines/{id}/versions/{version_id}`: the version with its `pipeline_spec` (as `_spec` makes it).
- list calls with a `filter` (JSON predicates; `EQUALS` on `display_name`) and proto field names in the
  JSON (`pipeline_id`, `pipeline_versions`, ...); empty lists are left out, as protojson does.
- `POST /runs`, `GET /runs/{id}` (its `state`: PENDING until a test sets another; unknown: 404),
  `POST /recurringruns`, `GET /recurringruns?experiment_id=`, `DELETE /recurringruns/{id}`, experiments by name.

It stores what it was given (`pipelines`, `versions` with their parsed spec, `runs`, `recurring`), so
that a test can check what the real client sent. Single-user mode (`multi_user: false`).
"""

from __future__ import annotations

import email.parser
import json
import threading
import urllib.parse
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

PREFIX = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(obj: dict, flt: str) -> bool:
    if not flt:
        return True
    for p in json.loads(flt).get("predicates", []):
        if p.get("operation") not in ("EQUALS", 1):  # protojson takes the enum's name or its number
            raise ValueError(f"the stand-in supports EQUALS only, got {p}")
        if obj.get(p["key"]) != p.get("stringValue"):
            return False
    return True


def _spec(data: bytes) -> dict:
    """The version's `pipeline_spec` as the server returns it: the pipeline spec, or, when the file has a
    second document (kfp-kubernetes' platform spec), both under `pipeline_spec` and `platform_spec`."""
    docs = [d for d in yaml.safe_load_all(data) if d]
    if not docs or "deploymentSpec" not in docs[0]:
        raise ValueError("not a KFP v2 pipeline spec")
    return docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}


class JsonHandler(BaseHTTPRequestHandler):
    """A stand-in's request handler: JSON answers, no access log."""

    def _answer(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class KfpStandIn:
    def __init__(self) -> None:
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id -> version (with its pipeline_id and parsed spec)
        self.experiments: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.recurring: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KfpStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # what the real server does, call by call
    def _version(self, pipeline_id: str, name: str, spec: bytes, description: str) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "name": name,
                   "display_name": name, "description": description, "created_at": _now(),
                   "pipeline_spec": _spec(spec)}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def upload(self, query: dict, spec: bytes) -> tuple[int, dict]:
        name = query.get("name") or query.get("display_name")
        if any(p["display_name"] == name for p in self.pipelines.values()):
            return 409, {"error": "Failed to create a pipeline and a pipeline version", "code": 6}
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": name,
                    "description": query.get("description", ""), "created_at": _now()}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._version(pipeline["pipeline_id"], name, spec, pipeline["description"])
        return 200, pipeline

    def upload_version(self, query: dict, spec: bytes) -> tuple[int, dict]:
        pipeline_id = query.get("pipelineid", "")
        if not pipeline_id or pipeline_id not in self.pipelines:
            return 400, {"error": "Failed to create a pipeline version", "code": 3}
        name = query.get("name") or query.get("display_name")
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            return 409, {"error": "Failed to create a pipeline version", "code": 6}
        return 200, self._version(pipeline_id, name, spec, query.get("description", ""))

    def get(self, path: str, query: dict) -> tuple[int, dict]:
        flt = query.get("filter", "")
        if path == "/healthz":
            return 200, {"multi_user": False}
        if path == "/pipelines":
            found = [p for p in self.pipelines.values() if _matches(p, flt)]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        parts = path.split("/")
        if len(parts) == 5 and parts[1] == "pipelines" and parts[3] == "versions":  # GetPipelineVersion, with its spec
            version = self.versions.get(parts[4])
            if version is None or version["pipeline_id"] != parts[2]:
                return 404, {"error": f"pipeline version {parts[4]} not found", "code": 5}
            return 200, version
        if path.startswith("/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[2]
            found = [{k: v for k, v in x.items() if k != "pipeline_spec"} for x in self.versions.values()
                     if x["pipeline_id"] == pipeline_id and _matches(x, flt)]
            if query.get("sort_by"):  # "<field> [desc]", as the server's list options read it
                key, _, order = query["sort_by"].partition(" ")
                found.sort(key=lambda v: v.get(key, ""), reverse=order == "desc")
            found = found[:int(query.get("page_size") or len(found) or 1)]
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if path == "/experiments":
            found = [e for e in self.experiments.values() if _matches(e, flt)]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if path.startswith("/runs/"):  # GetRun: the run with its state (a test sets "FAILED" etc.); unknown: 404
            found = [r for r in self.runs if r["run_id"] == path.split("/")[2]]
            return (200, found[0]) if found else (404, {"error": f"run {path.split('/')[2]} not found", "code": 5})
        if path == "/recurringruns":
            found = [r for r in self.recurring.values()
                     if not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"]]
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}  # the proto's field name
        return 404, {"error": f"the stand-in does not serve GET {path}", "code": 5}

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/experiments":
            experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        reference = body.get("pipeline_version_reference") or {}
        if reference.get("pipeline_version_id") not in self.versions:
            return 400, {"error": f"unknown pipeline version {reference}", "code": 3}
        if path == "/runs":
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
            self.runs.append(run)
            return 200, run
        if path == "/recurringruns":
            job = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED", "created_at": _now()}
            self.recurring[job["recurring_run_id"]] = job
            return 200, job
        return 404, {"error": f"the stand-in does not serve POST {path}", "code": 5}

    def _handler(self):
        stand_in = self

        class Handler(JsonHandler):
            def _route(self, method: str) -> None:
                try:
                    self._serve(method)
                except ValueError as exc:  # a request the real server would refuse too (bad filter, bad spec)
                    self._answer(400, {"error": str(exc), "code": 3})

            def _serve(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                if not url.path.startswith(PREFIX):
                    return self._answer(404, {"error": f"not a v2beta1 path: {url.path}"})
                path, query = url.path[len(PREFIX):], dict(urllib.parse.parse_qsl(url.query))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stand_in._lock:
                    stand_in.calls.append((method, path))
                    if method == "GET":
                        return self._answer(*stand_in.get(path, query))
                    if method == "DELETE" and path.startswith("/recurringruns/"):
                        stand_in.recurring.pop(path.rsplit("/", 1)[1], None)
                        return self._answer(200, {})
                    if path in ("/pipelines/upload", "/pipelines/upload_version"):
                        message = email.parser.BytesParser().parsebytes(
                            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                        files = [p for p in message.get_payload() if p.get_param("name", header="content-disposition") == "uploadfile"]
                        if not files:
                            return self._answer(400, {"error": "Failed to read pipeline from file", "code": 3})
                        spec = files[0].get_payload(decode=True)
                        upload = stand_in.upload if path.endswith("/upload") else stand_in.upload_version
                        return self._answer(*upload(query, spec))
                    return self._answer(*stand_in.post(path, json.loads(body or b"{}")))

            def do_GET(self):  # noqa: N802 - http.server's names
                self._route("GET")

            def do_POST(self):  # noqa: N802
                self._route("POST")

            def do_DELETE(self):  # noqa: N802
                self._route("DELETE")

        return Handler
