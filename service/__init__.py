"""vitserve's HTTP service. `__version__` is the one home of the version: pyproject.toml reads it from here
(`[tool.setuptools.dynamic]`), the app and the V2 server metadata import it, and images are tagged with it."""

__version__ = "0.1.0"
