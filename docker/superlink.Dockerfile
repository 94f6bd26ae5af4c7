# The SuperLink: Flower's own image at the app's flwr version, plus a state folder
# (owned by the image's `app` user) for the --database volume.
#
#   docker build -f docker/superlink.Dockerfile -t fedpurel/superlink:1.41.0 .
#
# In process isolation (deploy/compose*.yml) the SuperLink runs no app code: the
# ServerApp runs in the SuperExec image (docker/superexec.Dockerfile).
ARG FLWR_VERSION=1.41.0
FROM flwr/superlink:${FLWR_VERSION}

WORKDIR /app
RUN mkdir -p /app/state && chmod 700 /app/state
VOLUME ["/app/state"]
ENTRYPOINT ["flower-superlink"]
