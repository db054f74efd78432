"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

The only package that imports grpc. ``grpc_service.proto`` defines the service with KServe's and
Triton's message names and field numbers, so that stock clients work; the modules generated from
it (``grpc_service_pb2*``) are committed, and ``python fpn_serve/grpc/generate.py`` regenerates
them (README.md here). ``server.GrpcEndpoint`` runs the service beside uvicorn on the same asyncio
loop and registry; ``service`` holds the calls, ``wire`` the conversions between the messages and
``fpn_serve.oip``, ``errors`` the one table from exception to status code.
"""

from .server import GrpcEndpoint

__all__ = ["GrpcEndpoint"]
