"""Container healthcheck for Flower's SuperLink, SuperNode and SuperExec (compose `healthcheck:`).

    python /opt/fedpurel/healthcheck.py HEALTH_ADDRESS [TCP_ADDRESS ...]

Exit 0 when the gRPC server that Flower starts with --health-server-address (plain text,
container-local; its health service always reports SERVING) answers an HTTP/2 connection
preface with its SETTINGS frame, and every TCP_ADDRESS (e.g. the SuperLink's own API port)
accepts a connection; exit 1 otherwise. Only the standard library: a probe runs every few
seconds in every container, and importing grpc would cost more CPU than the probe itself.
"""

import socket
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def http2_answers(address: str) -> bool:
    with socket.create_connection(split(address), timeout=3) as sock:
        sock.sendall(PREFACE + EMPTY_SETTINGS)
        header = b""
        while len(header) < 9:
            chunk = sock.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    return header[3] == 0x04  # the server's first frame is its SETTINGS


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if not http2_answers(argv[0]):
            print(f"unhealthy: {argv[0]} is not a gRPC server", file=sys.stderr)
            return 1
        for address in argv[1:]:
            socket.create_connection(split(address), timeout=3).close()
    except (OSError, ValueError) as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
