# gradwire's server on a CUDA PyTorch base. Build and run with docker compose (docker-compose.yml).
# The base image's torch (2.8, CUDA 12.9, Python 3.11) satisfies the package's torch range,
# so pip installs only gradwire and its gRPC dependencies on top of it.
FROM pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/gradwire
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY proto ./proto
COPY client ./client
COPY server ./server
# The gRPC and protobuf versions CI tested (constraints.txt), not the newest on the day of a build.
RUN pip install -c constraints.txt ".[server]" && gradwire --help > /dev/null

# Unprivileged at run time: the service needs nothing root has. Its state (weights,
# gradients, optimizer state) is saved to /var/lib/gradwire at a graceful stop and restored
# at start: a volume, owned by that user, so that a fresh (named) volume is writable too.
RUN useradd --create-home --uid 10001 gradwire \
    && mkdir -p /var/lib/gradwire && chown gradwire:gradwire /var/lib/gradwire
VOLUME /var/lib/gradwire
USER gradwire

EXPOSE 50051
# The standard grpc.health.v1 check, for `docker run` as for compose (whose own healthcheck,
# the same command, is there to be changed: with TLS it needs --tls-ca).
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=12 \
    CMD ["gradwire", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
# Inside the container the server must listen on all interfaces for the published port to
# reach it; docker-compose.yml publishes it on the host's loopback only.
CMD ["gradwire", "serve", "--host", "0.0.0.0", "--port", "50051", "--device", "auto", \
     "--state-dir", "/var/lib/gradwire"]
