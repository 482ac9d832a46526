# One image for every service of docker-compose.yml: the data job, the workers and the coordinator.
#   docker compose build        (or: docker build -t fedlink-demo .)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from PyTorch's CPU index: the default wheel from PyPI pulls gigabytes of CUDA libraries that a
# CPU container never uses. Its own layer, so that editing fedlink does not download torch again.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch

# fedlink itself, with the demo extra (scikit-learn, for the bundled digits). torch is already satisfied, so
# pip keeps the CPU build. README* may be absent; the wildcard then copies nothing.
COPY pyproject.toml README* /tmp/fedlink/
COPY common/ /tmp/fedlink/common/
COPY protocol/ /tmp/fedlink/protocol/
COPY server/ /tmp/fedlink/server/
COPY worker/ /tmp/fedlink/worker/
RUN pip install /tmp/fedlink && rm -rf /tmp/fedlink

# An unprivileged user. Every named volume of docker-compose.yml is mounted on one of these folders: Docker gives
# a new volume the owner of the folder it is first mounted on, so they must exist here, owned by that user.
RUN useradd --create-home --uid 10001 --user-group fedlink \
 && mkdir -p /data /runs /config /shards/coordinator /shards/worker-1 /shards/worker-2 /shards/worker-3 \
 && chown fedlink:fedlink /data /runs /config /shards /shards/coordinator /shards/worker-1 /shards/worker-2 /shards/worker-3 \
 && mkdir -p /secrets /certs/ca /certs/coordinator /certs/worker-1 /certs/worker-2 /certs/worker-3 \
 && chown fedlink:fedlink /secrets /certs /certs/ca /certs/coordinator /certs/worker-1 /certs/worker-2 /certs/worker-3 \
 && chmod 700 /secrets /certs/ca /certs/coordinator /certs/worker-1 /certs/worker-2 /certs/worker-3

WORKDIR /app
COPY docker/make_shards.py /app/docker/make_shards.py
USER fedlink

EXPOSE 8777
CMD ["fl-worker", "--help"]
