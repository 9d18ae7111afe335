# The image every pipeline step and every Ray worker runs: the locked environment and this project.
#   docker build -t REGION-docker.pkg.dev/PROJECT/maskrcnn/platform:TAG .
# Its Python (first on PATH) has kfp, so it is the base image of the KFP components
# (`uv run -m pipelines.compile --image ...`), and Ray's image for a KubeRay cluster (ray/).
FROM python:3.11.11-slim-bookworm

COPY --from=ghcr.io/astral-sh/uv:0.9.8 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Dependencies first (cached while only the code changes), then the project itself (not devstack/:
# development infrastructure has no place in the production image).
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project
COPY training ./training
COPY release ./release
COPY pipelines ./pipelines
COPY serving ./serving
RUN uv sync --locked --no-dev \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /home/app/.cache && chown -R app /home/app

USER app
ENV HOME=/home/app MASKRCNN_CACHE=/home/app/.cache/maskrcnn-platform
CMD ["python", "-m", "training.ray_main"]
