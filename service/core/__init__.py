"""What the service does, whatever the transport: artifacts loaded into onnxruntime sessions (`runtime`), the
dynamic batcher and admission, decoding and preprocessing (`imaging`, `pipeline`), attention overlays, the memory
budgets, hot reload, and `ServiceState`, which holds them for a running server. Knows nothing of HTTP."""
