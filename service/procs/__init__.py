"""Multi-process mode: the supervisor starts one engine (every model's sessions, `engine`) and N HTTP workers
(`worker`), which reach the engine through `engine_client` over the `wire` protocol; `bootstrap` is what every
process shares (exit codes, the child environment, dying with the parent)."""
