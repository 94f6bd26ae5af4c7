# The SuperLink: Flower's own image at the app's flwr version, plus a state folder
# (owned by the image's `app` user) for the --database volume and the healthcheck probe.
#
#   docker build -f docker/superlink.Dockerfile -t fedpurel/superlink:1.41.0 .
#
# In process isolation (deploy/compose*.yml) the SuperLink runs no app code: the
# ServerApp runs in the SuperExec image (docker/superexec.Dockerfile). The tag is
# pinned with its suffix: Flower's plain tag follows Flower's default Python and OS.
# The same image also registers SuperNode keys (it has the flwr CLI).
ARG FLWR_VERSION=1.41.0
ARG PYTHON_VERSION=3.13
ARG BASE_OS=alpine3.22
FROM flwr/superlink:${FLWR_VERSION}-py${PYTHON_VERSION}-${BASE_OS}

COPY docker/healthcheck.py /opt/fedpurel/healthcheck.py
WORKDIR /app
RUN mkdir -p /app/state && chmod 700 /app/state
VOLUME ["/app/state"]
ENTRYPOINT ["flower-superlink"]
