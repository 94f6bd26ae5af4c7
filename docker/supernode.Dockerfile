# The SuperNode: Flower's own image at the app's flwr version.
#
#   docker build -f docker/supernode.Dockerfile -t fedpurel/supernode:1.41.0 .
#
# In process isolation (deploy/compose*.yml) the SuperNode only relays messages;
# every ClientApp message runs in the node's SuperExec container
# (docker/superexec.Dockerfile, with torch and the app's dependencies), which is
# where the node's data, private state (state-dir) and GPU are mounted.
ARG FLWR_VERSION=1.41.0
FROM flwr/supernode:${FLWR_VERSION}

WORKDIR /app
ENTRYPOINT ["flower-supernode"]
