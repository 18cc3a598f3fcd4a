# CPU serving image: Triton (bundled in nvidia-pytriton, python backend + ONNX Runtime) and the
# gRPC gateway. Training/export dependencies (torch, onnx) are not needed to serve.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/vqs

COPY pyproject.toml README.md ./
COPY server ./server
COPY clients ./clients
COPY export/__init__.py ./export/__init__.py
COPY model_repository ./model_repository
RUN pip install .

# Bind all interfaces inside the container; publish only what you need.
ENV VQS_HOST=0.0.0.0 VQS_GRPC_PORT=50051 VQS_METRICS_PORT=9090
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2, health_pb2_grpc; \
s = health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); \
sys.exit(s.Check(health_pb2.HealthCheckRequest(), timeout=2).status != 1)"
CMD ["vqs", "serve"]
