"""The Open Inference Protocol (V2): its core (`core`), its codecs (`codec`: JSON and the binary tensor data
extension; `grpc_codec`: protobuf messages) and Triton's system shared memory extension (`shared_memory`). The
transports that speak it (service.api.v2, service.http.fast_path, service.grpc_v2) only call in here."""
