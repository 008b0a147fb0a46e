"""Generates the gRPC stubs from proto/ into src/infer_proto/ whenever the package is built, and
compiles the three C extensions, the server's ``infer_server._wire`` (replies written from its
records) and ``infer_server._records`` (its records made without a ``__dict__``), and the client's
``infer_client._replies`` (results read from a reply's bytes): a C compiler and Python's headers
are needed to install the package.

Stubs are never committed: a wheel build and an editable install (`pip install -e .`) both run
``build_py`` first, which calls ``grpc_tools.protoc`` on ``proto/infer.proto`` (this server's API)
and ``proto/inference.proto`` (the Open Inference Protocol it also speaks). The virtual include
path ``infer_proto=proto`` makes the generated code import ``from infer_proto import infer_pb2``.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    proto_include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_include}",
        f"-Iinfer_proto={ROOT / 'proto'}",
        f"--python_out={ROOT / 'src'}",
        f"--pyi_out={ROOT / 'src'}",
        f"--grpc_python_out={ROOT / 'src'}",
        "infer_proto/infer.proto",
        "infer_proto/inference.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/infer.proto or proto/inference.proto")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithStubs},
    ext_modules=[
        Extension("infer_server._wire", ["src/infer_server/_wire.c"], extra_compile_args=["-O2", "-Wall"]),
        Extension("infer_server._records", ["src/infer_server/_records.c"], extra_compile_args=["-O2", "-Wall"]),
        Extension("infer_client._replies", ["src/infer_client/_replies.c"], extra_compile_args=["-O2", "-Wall"]),
    ],
)
