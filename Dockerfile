# One image for every Python service of vebaq: producer, workers, Flower, and the demo's fake
# vROps and driver. Compose picks the command; e.g.
#   docker run --rm --init vebaq vebaq worker --pool echo
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The dependencies first, read from pyproject.toml: this layer survives code changes.
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the project itself (not editable; the source tree is not kept).
COPY README.md /src/README.md
COPY vebaq /src/vebaq
COPY producer /src/producer
COPY workers /src/workers
RUN pip install --no-cache-dir --no-deps /src \
 && rm -rf /src \
 && vebaq --version

# A non-root user; /data is where Flower keeps its state (a volume in compose.yaml).
RUN groupadd --gid 10001 vebaq \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vebaq \
 && mkdir -p /data /app && chown vebaq:vebaq /data
USER 10001:10001
WORKDIR /app

# producer /metrics /stats /healthz, the ingress, Flower, fake vROps
EXPOSE 8080 8081 5555 8090

# Exec form: the command is the main process (under `init: true`'s tini), so SIGTERM from
# `docker compose stop` reaches Celery and starts its warm shutdown.
CMD ["vebaq", "--help"]
