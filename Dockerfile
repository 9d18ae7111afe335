# Two images from one Dockerfile, both as uid 1000:
#
# - `platform` (the default, last stage): the locked environment and this project. Every pipeline step
#   and every Ray node runs it. Its Python, first on PATH, has kfp, so it is the base image of the KFP
#   components (`uv run -m pipelines.compile --image ...`) and Ray's image for a KubeRay cluster (ray/).
#     podman build --target platform -t REGION-docker.pkg.dev/PROJECT/maskrcnn/platform:TAG .
# - `serving`: the KServe predictor and nothing else. It has ONNX Runtime and no torch or CUDA libraries,
#   and serves packages that have a graph (`detector.onnx`). It refuses a package without one and names
#   the platform image, which serves it eagerly. This is the ServingRuntime's image (deployment/).
#     podman build --target serving -t REGION-docker.pkg.dev/PROJECT/maskrcnn/serving:TAG .
#
# `uv run -m devstack image` builds both offline from a Debian base.
#
# Build arguments:
#   BASE        any image with Python 3.11 or 3.12 as `python3` and a CA bundle (default: the public slim image,
#               pinned by digest: a tag can be pushed again, a digest cannot)
#   UV_VERSION, UV_SHA256
#               uv, installed from PyPI, and the SHA-256 of its wheels (x86_64 and aarch64, as PyPI lists
#               them): pip installs no other file. Change both together.
#   GIT_COMMIT  recorded on every MLflow run and package made in the image (there is no .git inside)
# Every Python package comes from uv.lock with its hash checked: `uv sync --locked` (the platform image)
# verifies the lock's hashes, and the serving image installs `uv export --only-group serving` with
# --require-hashes.
ARG BASE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${BASE} AS tools
ARG UV_VERSION=0.13.9
ARG UV_SHA256="d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19 5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe"
# The system CA bundle for pip and uv (behind a TLS-inspecting proxy, mount the host's at build time).
RUN python3 -m venv /opt/uv \
    && printf 'uv==%s' "${UV_VERSION}" > /tmp/uv.txt \
    && for hash in ${UV_SHA256}; do printf ' --hash=sha256:%s' "${hash}" >> /tmp/uv.txt; done \
    && /opt/uv/bin/pip install --quiet --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt --require-hashes \
       --requirement /tmp/uv.txt \
    && rm /tmp/uv.txt && ln -s /opt/uv/bin/uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1 PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1

# The serving environment: pyproject's `serving` group at the versions uv.lock pins, each file's hash
# required, so that both images run the same onnxruntime, kserve and numpy, and nothing else gets in.
FROM tools AS serving-env
WORKDIR /build
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,id=maskrcnn-uv,target=/root/.cache/uv \
    uv export --locked --only-group serving --no-emit-project --format requirements-txt --output-file serving.txt --quiet \
    && uv venv --quiet /opt/venv \
    && uv pip install --quiet --python /opt/venv/bin/python --require-hashes --requirements serving.txt \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch reached the serving image" >&2; exit 1; fi

FROM ${BASE} AS serving
ARG GIT_COMMIT=""
COPY --from=serving-env /opt/venv /opt/venv
# Only what the predictor imports: the bottom package (maskrcnn/: the package reader, the graph's runtime,
# pre- and post-processing) and serving/.
COPY maskrcnn /app/maskrcnn
COPY serving /app/serving
RUN useradd --create-home --home-dir /home/app --uid 1000 --user-group app && mkdir -p /work && chown 1000:1000 /work
USER 1000:1000
WORKDIR /work
# The platform image named in the refusal of a package without a graph.
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 HOME=/home/app \
    MASKRCNN_CACHE=/tmp/maskrcnn-serving MASKRCNN_GIT_COMMIT=${GIT_COMMIT} \
    MASKRCNN_EAGER_IMAGE="the platform image (REGION-docker.pkg.dev/PROJECT/maskrcnn/platform, the Dockerfile's platform target)"
CMD ["python", "-m", "serving"]

# The platform image: the whole locked environment and the project.
FROM tools AS platform
ARG GIT_COMMIT=""
WORKDIR /app
# Dependencies first (cached while only the code changes), then the project itself (not devstack/:
# development infrastructure has no place in the production image). uv's cache stays out of the layers.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,id=maskrcnn-uv,target=/root/.cache/uv uv sync --locked --no-dev --no-install-project
COPY maskrcnn ./maskrcnn
COPY training ./training
COPY release ./release
COPY pipelines ./pipelines
COPY serving ./serving
COPY batch ./batch
RUN --mount=type=cache,id=maskrcnn-uv,target=/root/.cache/uv uv sync --locked --no-dev \
    && useradd --create-home --home-dir /home/app --uid 1000 --user-group app \
    && mkdir -p /work && chown 1000:1000 /work \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/00-venv.sh

# Login shells (`bash -lc`, how KubeRay before 1.4 starts Ray) reset PATH: /etc/profile.d puts the venv back.
# Numeric, so that Kubernetes' runAsNonRoot can verify it. The code is root-owned and read-only to the
# user; the working folder /work (checkpoints, the SQLite fallback) and HOME are the user's. Under
# readOnlyRootFilesystem, mount an emptyDir at /work and /tmp.
USER 1000:1000
WORKDIR /work
ENV HOME=/home/app MASKRCNN_CACHE=/home/app/.cache/maskrcnn-platform MASKRCNN_GIT_COMMIT=${GIT_COMMIT}
CMD ["python", "-m", "training.ray_main"]
