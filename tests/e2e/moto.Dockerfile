# syntax=docker/dockerfile:1
# Fake AWS for tests/e2e: moto's server behind fake_aws.py's IAM gate, which enforces
# deploy/iam/policy.json and trust-policy.json. Build from the repository root:
#
#   docker build -f tests/e2e/moto.Dockerfile -t ccred-fake-aws:e2e .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
# constraints.tx[t]: copied if present, skipped if not (fake_aws.py makes the set non-empty,
# which the legacy builder requires).
COPY tests/e2e/fake_aws.py constraints.tx[t] /tmp/build/
RUN set -eu; \
    if [ -f /tmp/build/constraints.txt ]; then set -- --constraint /tmp/build/constraints.txt; fi; \
    pip install "$@" "moto>=5.1,<6" "flask>=3" "flask-cors>=5" boto3; \
    rm -rf /tmp/build
COPY deploy/iam/policy.json deploy/iam/trust-policy.json /app/iam/
COPY tests/e2e/fake_aws.py /app/
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["python", "/app/fake_aws.py"]
CMD ["--port", "5000", "--iam-dir", "/app/iam"]
