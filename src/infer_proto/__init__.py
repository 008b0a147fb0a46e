"""gRPC stubs for ``proto/infer.proto`` (package ``infer.v1``), generated at build/install time.

``infer_pb2``/``infer_pb2_grpc`` appear here when the project is installed (``setup.py`` runs
protoc); they are not in git.
"""
