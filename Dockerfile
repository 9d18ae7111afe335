# The image every pipeline step, every Ray node and the KServe predictor runs: the locked environment
# and this project, as uid 1000.
#   podman build -t REGION-docker.pkg.dev/PROJECT/maskrcnn/platform:TAG .      (or docker build)
# Its Python (first on PATH) has kfp, so it is the base image of the KFP components
# (`uv run -m pipelines.compile --image ...`), Ray's image for a KubeRay cluster (ray/) and the
# ServingRuntime's image (deployment/). `uv run -m devstack image` builds it offline from a Debian base.
#
# Build arguments:
#   BASE        any image with Python 3.11 or 3.12 as `python3` and a CA bundle (default: the public slim image)
#   UV_VERSION  uv, installed from PyPI
#   GIT_COMMIT  recorded on every MLflow run and package made in the image (there is no .git inside)
ARG BASE=python:3.11.11-slim-bookworm
FROM ${BASE}
ARG UV_VERSION=0.13.9
ARG GIT_COMMIT=""

# The system CA bundle for pip and uv (behind a TLS-inspecting proxy, mount the host's at build time).
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --quiet --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt "uv==${UV_VERSION}" \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1 PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1

WORKDIR /app
# Dependencies first (cached while only the code changes), then the project itself (not devstack/:
# development infrastructure has no place in the production image). uv's cache stays out of the layers.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,id=maskrcnn-uv,target=/root/.cache/uv uv sync --locked --no-dev --no-install-project
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
