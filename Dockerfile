# syntax=docker/dockerfile:1
#
# One image for every Orchestrix process; the command picks the service:
#   docker run IMAGE                 -> orchestrix api (the default)
#   docker run IMAGE scheduler       -> orchestrix scheduler
#   docker run IMAGE worker          -> orchestrix worker
#   docker run IMAGE migrate up      -> orchestrix migrate up
# Configuration comes from the environment only (see `orchestrix COMMAND --help`).

# --- builder: build the project's wheel, install it and its dependencies into a venv ---
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# pyproject names README.md as the long description.
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY migrations/ migrations/
COPY services/ services/

# The wheel is what ships: the alembic revisions travel inside it as
# orchestrix.migrations, so `orchestrix migrate up` needs nothing from /src.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/orchestrix-*.whl

# --- final: the venv on a clean base, run as an unprivileged user ---
FROM python:3.11-slim

LABEL org.opencontainers.image.title="orchestrix" \
      org.opencontainers.image.description="Orchestrix job engine: api, scheduler, worker and migrations in one image" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid/gid so volume ownership and Kubernetes securityContext
# (runAsUser: 10001, runAsNonRoot: true) can rely on it.
RUN groupadd --system --gid 10001 orchestrix \
 && useradd --system --uid 10001 --gid orchestrix --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orchestrix

# Owned by root and read-only to the service user: the process cannot alter its own code.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json

# Numeric, so an orchestrator can verify the user is not root without reading /etc/passwd.
USER 10001:10001

# 8080: the API (API_PORT). 9100: /metrics, /health, /ready of scheduler and worker (METRICS_PORT).
EXPOSE 8080 9100

# Exec form: orchestrix is PID 1 and receives SIGTERM itself; api, scheduler and
# worker handle it by draining (the worker within SHUTDOWN_TIMEOUT).
ENTRYPOINT ["orchestrix"]
CMD ["api"]
