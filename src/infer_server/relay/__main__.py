"""``python -m infer_server.relay <fd> <index> <event loop>``: one gRPC front process (``relay.process``)."""

import sys

from infer_proto.grpc_io import prefer_epoll_io

prefer_epoll_io()  # before grpc is imported (the main process set it already: inherited, a no-op then)

from infer_server.relay.process import main  # noqa: E402

main(sys.argv[1:])
