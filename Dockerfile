# canarygate: the gateway as a container. Build: docker build -t canarygate .
# Run:   docker run -p 8080:8080 -v "$PWD/policies:/etc/canarygate/policies:ro" canarygate
# Policies are read from the mounted directory; secrets come from the environment (-e / --env-file).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: a virtual environment with canarygate and its dependencies, from pyproject.toml.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/canarygate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Not editable: the package is copied into the environment, so /src is left behind with this stage.
RUN /opt/canarygate/bin/pip install --no-cache-dir . \
    && /opt/canarygate/bin/python -m compileall -q /opt/canarygate/lib

# Final stage: the same slim base, no compilers, no pip cache, no sources; a non-root user.
FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid "${UID}" canarygate \
    && useradd --system --uid "${UID}" --gid canarygate --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin canarygate \
    && mkdir -p /etc/canarygate/policies
COPY --from=build /opt/canarygate /opt/canarygate
ENV PATH=/opt/canarygate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CANARYGATE_HOST=0.0.0.0 \
    CANARYGATE_PORT=8080 \
    CANARYGATE_POLICY_DIR=/etc/canarygate/policies \
    CANARYGATE_WORKERS=1 \
    CANARYGATE_LOG_LEVEL=info
USER ${UID}:${UID}
WORKDIR /tmp
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["canarygate", "healthcheck"]
ENTRYPOINT ["canarygate"]
CMD ["serve"]
