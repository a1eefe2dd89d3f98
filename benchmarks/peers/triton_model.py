"""A Triton Python-backend model serving a vitserve ONNX artifact: the Triton peer's model code.

benchmarks/servers.py writes a model repository with this file as `<model>/1/model.py` and a `config.pbtxt`
whose parameters say what to serve:

- `artifact`: the artifact directory (its `artifact.json` and classify graph);
- `input`: `pixel_values` (FP32 [N, 3, H, W], the tensors go straight to onnxruntime) or `image` (BYTES, one
  encoded image per batch row, decoded and preprocessed here exactly as vitserve does it, with
  `service.core.imaging.decode_image` and `vit_artifact.preprocessing.preprocess`);
- `max_pixels`: the decode limit, as VITSERVE_MAX_PIXELS.

The nvidia-pytriton wheel ships no onnxruntime backend (only the Python backend), so the graph runs in an
onnxruntime session held by this model, built with the options vitserve's own sessions use. Triton's dynamic
batcher hands `execute` every request that queued while the previous batch ran; all of them go through one
`session.run`. Outputs are vitserve's V2 defaults, `logits` and `probabilities`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

from service.core.imaging import decode_image
from service.errors import ServiceError
from vit_artifact.metadata import INPUT_NAME, read_metadata
from vit_artifact.preprocessing import preprocess

IMAGE_INPUT = "image"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(parameters["artifact"])
        self.input = parameters["input"]
        self.max_pixels = int(parameters["max_pixels"])
        self.meta = read_metadata(artifact)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(parameters.get("threads", "0"))
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as service.core.runtime does
        graph = artifact / self.meta.graphs["classify"].file
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a request whose input is bad gets an error, the others an answer."""
        batches: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                batches.append(self._pixels(request))
                errors.append(None)
            except (ServiceError, ValueError) as e:
                batches.append(None)
                errors.append(str(getattr(e, "message", e)))
        good = [b for b in batches if b is not None]
        logits = self.session.run(None, {INPUT_NAME: np.concatenate(good)})[0] if good else None
        responses, offset = [], 0
        for batch, error in zip(batches, errors, strict=True):
            if batch is None or logits is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error or "no input")))
                continue
            rows = logits[offset : offset + len(batch)].astype(np.float32)
            offset += len(batch)
            shifted = np.exp((rows - rows.max(axis=1, keepdims=True)).astype(np.float64))  # as service.core.pipeline
            probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("logits", rows), pb_utils.Tensor("probabilities", probabilities)]
                )
            )
        return responses

    def _pixels(self, request: Any) -> np.ndarray:
        """The request's rows as model-ready pixels (n, 3, H, W)."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
        if self.input == INPUT_NAME:
            return tensor
        # BYTES [n, 1]: each element is an encoded image (numpy object array of bytes).
        return np.stack(
            [
                preprocess(
                    decode_image(
                        bytes(data),
                        max_pixels=self.max_pixels,
                        target_size=self.meta.preprocessing.resize_size,
                    ),
                    self.meta.preprocessing,
                )
                for data in tensor.reshape(-1)
            ]
        )
