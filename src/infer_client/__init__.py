"""Client library of the inference server (``infer.v1.InferenceService``).

``InferClient`` (blocking) and ``AsyncInferClient`` (asyncio) share one surface: ``push`` and
``pull`` mirror the RPCs, ``session()`` opens a ``Session`` stream (push after push, results as
they complete, on one RPC: the fast path; over the server's local socket, without gRPC, when the
blocking client is given one), ``detect`` pushes one batch on the client's own session
and returns its results ordered by index, ``health``/``wait_ready`` query the standard health
service, ``models`` lists and changes the models that serve (``ModelAdmin``). On the server's host the images travel
through a file in the shared tmpfs directory (``transport="auto"`` picks it); elsewhere inline.
Every RPC failure is an :class:`InferError` carrying the gRPC status code. A server that asks
who is calling gets a :class:`Credentials` (a bearer token, TLS, a client certificate).
"""

from infer_client._protocol import Credentials, ImageSource, InferError, Transport
from infer_client.aio import AsyncInferClient
from infer_client.client import InferClient
from infer_client.local import LocalSession
from infer_client.models import DriftReport, ModelAdmin, ModelInfo
from infer_client.results import Attribute, Box, Detection, ImageResult
from infer_client.routed import AsyncRoutedSession, RoutedSession
from infer_client.session import AsyncSession, Session

__all__ = [
    "AsyncInferClient",
    "AsyncRoutedSession",
    "AsyncSession",
    "Attribute",
    "Box",
    "Credentials",
    "Detection",
    "DriftReport",
    "ImageResult",
    "ImageSource",
    "InferClient",
    "InferError",
    "LocalSession",
    "ModelAdmin",
    "ModelInfo",
    "RoutedSession",
    "Session",
    "Transport",
]
