# The router image: `python -m router` on port 8000. The same image runs evaluate_and_promote,
# rollback and (in deploy/docker-compose.yml) the MLflow tracking server.
#   docker build -t champion-challenger-router .
#   docker run -p 8000:8000 -v $PWD/config.yaml:/app/config.yaml:ro champion-challenger-router
# CI (.ci/image.sh) builds this same file with podman on a base made from Debian packages
# (--build-arg BASE_IMAGE=...): any base with python3.11 and pip first on PATH will do.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# OMP_NUM_THREADS=1: OpenMP models busy-wait on a second thread per process; one thread halves
# the CPU per request at the same throughput (DESIGN.md, measured facts).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

# Unprivileged user with a numeric id (Kubernetes runAsNonRoot can verify it).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --no-log-init --create-home --home-dir /home/app app \
    && mkdir -p /app /mlartifacts \
    && chown app:app /app /mlartifacts

# The dependencies, from pyproject.toml alone, in their own layer: a source change reuses it.
# Only wheels are installed (no compiler in the image), and PIP_NO_CACHE_DIR leaves no cache.
COPY pyproject.toml /tmp/deps/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/deps/requirements.txt \
    && pip install --only-binary=:all: -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

# The package itself, from a throw-away copy of the source so that only the installed package
# is imported.
COPY pyproject.toml README.md /src/
COPY router /src/router
COPY experiments /src/experiments
COPY demo /src/demo
RUN pip install --no-deps /src && rm -rf /src

WORKDIR /app
# The default configuration; mount your own over it (compose: deploy/config.compose.yaml,
# Kubernetes: the ConfigMap). Relative SQLite paths in it resolve against /app.
COPY --chown=app:app config.yaml /app/config.yaml

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["python", "-m", "router", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8000"]
