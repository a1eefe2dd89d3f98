"""KServe's gRPC client, unmodified, in a process of its own: its generated protobuf module and tritonclient's
both define `inference.*` in protobuf's default descriptor pool, so one process cannot import both.

    python tests/service/kserve_grpc_client.py HOST:PORT KEY PNG...    (prints a JSON report)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(url: str, key: str, pngs: list[bytes], pixels: np.ndarray) -> dict:
    client = InferenceGRPCClient(url)
    metadata = (("x-api-key", key),)
    try:
        report: dict = {
            "live": await client.is_server_live(headers=metadata),
            "model_ready": await client.is_model_ready("digits-vit", headers=metadata),
        }
        # Typed contents (binary_data=False): FP32 in fp32_contents; the answer comes back typed too.
        typed = InferInput("pixel_values", list(pixels.shape), "FP32")
        typed.set_data_from_numpy(pixels, binary_data=False)
        result = await client.infer(InferRequest(model_name="digits-vit", infer_inputs=[typed]), headers=metadata)
        report["typed_logits"] = {o.name: o.as_numpy().tolist() for o in result.outputs}["logits"]
        # Raw contents: encoded images as BYTES in raw_input_contents.
        images = InferInput("image", [len(pngs)], "BYTES")
        images.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
        result = await client.infer(InferRequest(model_name="digits-vit", infer_inputs=[images]), headers=metadata)
        report["raw_probabilities"] = {o.name: o.as_numpy().tolist() for o in result.outputs}["probabilities"]
    finally:
        await client.close()
    return report


if __name__ == "__main__":
    url, key, pixels_file, *png_files = sys.argv[1:]
    pngs = [Path(p).read_bytes() for p in png_files]
    print(json.dumps(asyncio.run(main(url, key, pngs, np.load(pixels_file)))))
