"""The HTTP transport: the gate every request passes (`gate`: keys, limits, body budget, admission, metrics,
the access line, errors), its ASGI adapter (`middleware`), the direct path for the hot routes (`fast_path`)
on vitserve's connection protocol (`protocol`, the only module that names uvicorn's internals), and the keys and
CORS rules (`security`)."""
