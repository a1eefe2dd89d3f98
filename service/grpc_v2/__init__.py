"""The Open Inference Protocol's `GRPCInferenceService` (V2 over gRPC), on its own port (`VITSERVE_GRPC_PORT`).

`open_inference_grpc.proto` is the protocol's published file, unchanged; `stubs` generates its Python code per
environment; `codec` turns its messages into the REST codec's request and back; `server` serves it beside the
HTTP app, on the same event loop, batcher, limits and keys.
"""
