# CPU serving image: Triton (bundled in nvidia-pytriton, python backend + ONNX Runtime) and the
# gRPC gateway. Training/export dependencies (torch, onnx) are not needed to serve.
#
# The base must provide Python 3.11 with its shared libpython (the Triton python-backend stub links
# it and must match the venv's major.minor). `make image` passes a base made locally with
# debootstrap; `docker build .` uses the official image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# Installed as a package, not editable, then the sources are removed. pip reaches the index with
# the builder's own settings (mounted at build time, never copied into a layer).
COPY pyproject.toml README.md /tmp/vqs-src/
COPY server /tmp/vqs-src/server
COPY clients /tmp/vqs-src/clients
COPY export/__init__.py /tmp/vqs-src/export/__init__.py
RUN pip install --no-cache-dir --disable-pip-version-check /tmp/vqs-src && rm -rf /tmp/vqs-src

# An installed package ships no models: the repository is data, found through its setting.
COPY model_repository /opt/vqs/model_repository
ENV VQS_TRITON__MODEL_REPOSITORY=/opt/vqs/model_repository
WORKDIR /opt/vqs

# Bind all interfaces inside the container; publish only what you need.
ENV VQS_HOST=0.0.0.0 VQS_GRPC_PORT=50051 VQS_METRICS_PORT=9090
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import grpc, os, sys; from grpc_health.v1 import health_pb2, health_pb2_grpc; \
s = health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ['VQS_GRPC_PORT'])); \
sys.exit(s.Check(health_pb2.HealthCheckRequest(), timeout=2).status != 1)"
CMD ["vqs", "serve"]
