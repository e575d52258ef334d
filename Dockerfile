# syntax=docker/dockerfile:1
# connector-credential-operator image: the operator (`connector-credentials run`) and the
# socket client (`connector-credentials get|list`) in one venv, running as uid 10001. The operator
# is installed with its `uvloop` extra: it serves and watches on uvloop (CCRED_EVENT_LOOP=auto).
#
#   docker build -t connector-credential-operator:0.1.0 .
#
# Dependencies are pinned by constraints.txt when it exists (pip -c). Pin the base image
# by digest for reproducible builds: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# README.m[d], constraints.tx[t]: copied if present, skipped if not.
COPY pyproject.toml README.m[d] constraints.tx[t] ./
COPY operator/ operator/
# The client distribution (connector-credentials-client), which the operator pins exactly.
COPY client/ client/
RUN set -eu; \
    if [ -f constraints.txt ]; then set -- --constraint constraints.txt; fi; \
    /opt/venv/bin/pip install "$@" ./client '.[uvloop]' ; \
    /opt/venv/bin/connector-credentials --help >/dev/null; \
    /opt/venv/bin/python -c "import uvloop"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="connector-credential-operator" \
      org.opencontainers.image.description="Serves AWS Secrets Manager credentials to a controller pod over a Unix socket, verified through IRSA" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 ccred \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ccred
COPY --from=builder /opt/venv /opt/venv
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
# kopf's liveness endpoint when run with --liveness=http://0.0.0.0:8080/healthz; /metrics as
# the manifests run it (--metrics-bind-address=:8081; its default is :8080, for runs without --liveness)
EXPOSE 8080 8081
ENTRYPOINT ["connector-credentials"]
CMD ["run"]
