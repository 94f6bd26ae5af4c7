# The SuperExec that runs FedPuReL's ServerApp (next to the SuperLink) or its
# ClientApp (next to each SuperNode): Flower's flwr/superexec image at the app's
# flwr version plus the app's runtime dependencies, read from pyproject.toml so
# that the pins (torch, torchvision, open_clip_torch, peft, ...) are the app's own.
#
#   # GPU hosts (ClientApp): PyPI's torch wheels for Linux x86_64 are CUDA builds
#   docker build -f docker/superexec.Dockerfile -t fedpurel/superexec:1.41.0 .
#   # CPU-only hosts (e.g. the ServerApp): CPU wheels, ~5 GB smaller
#   docker build -f docker/superexec.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t fedpurel/superexec-cpu:1.41.0 .
#
# Build context: the repository root. The app code itself is not in the image: it
# arrives as a FAB with every `flwr run`. Runtime dependency installation stays off
# (the SuperExec's default): the dependencies are baked in here.
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

# "" = PyPI (CUDA-enabled torch on Linux x86_64); a PyTorch wheel index for other builds.
ARG TORCH_INDEX_URL=""

WORKDIR /app
COPY pyproject.toml /tmp/fedpurel/pyproject.toml
COPY docker/requirements.py /tmp/fedpurel/requirements.py

# Every [project].dependencies entry except flwr itself (the base image has it, at the
# version this image is tagged with; requirements.py checks that the two agree).
RUN python /tmp/fedpurel/requirements.py /tmp/fedpurel/pyproject.toml > /tmp/fedpurel/requirements.txt \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      grep -E '^(torch|torchvision)==' /tmp/fedpurel/requirements.txt > /tmp/fedpurel/torch.txt \
      && python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/fedpurel/torch.txt; \
    fi \
 && python -m pip install --no-cache-dir -r /tmp/fedpurel/requirements.txt \
 && python -m pip check \
 && python /tmp/fedpurel/requirements.py --verify /tmp/fedpurel/pyproject.toml

# Mount points (a named volume copies this ownership on first use):
#   /app/state    the node's private state (node-config state-dir), owner-only
#   /app/data     the node's own dataset (run-config data-root), read-only
#   /app/cache    CLIP checkpoints (FEDPUREL_CACHE)
#   /app/outputs  the ServerApp's results (run-config output-dir)
RUN mkdir -p /app/state /app/data /app/cache /app/outputs && chmod 700 /app/state
ENV FEDPUREL_CACHE=/app/cache
# Look for a new ServerApp / ClientApp message every 0.1 s, not every second (Flower's default).
ENV FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1

ENTRYPOINT ["flower-superexec"]
