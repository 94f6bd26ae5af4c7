# The SuperNode: Flower's own image at the app's flwr version, plus the healthcheck probe.
#
#   docker build -f docker/supernode.Dockerfile -t fedpurel/supernode:1.41.0 .
#
# In process isolation (deploy/compose*.yml) the SuperNode only relays messages;
# every ClientApp message runs in the node's SuperExec container
# (docker/superexec.Dockerfile, with torch and the app's dependencies), which is
# where the node's data, private state (state-dir) and GPU are mounted. The tag is
# pinned with its suffix: Flower's plain tag follows Flower's default Python and OS.
ARG FLWR_VERSION=1.41.0
ARG PYTHON_VERSION=3.13
ARG BASE_OS=alpine3.22
FROM flwr/supernode:${FLWR_VERSION}-py${PYTHON_VERSION}-${BASE_OS}

COPY docker/healthcheck.py /opt/fedpurel/healthcheck.py
WORKDIR /app
ENTRYPOINT ["flower-supernode"]
