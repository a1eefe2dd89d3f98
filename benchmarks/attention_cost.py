"""What attention maps cost: ViT-B/16 at batch 8, the artifact's classify and attention paths against a plain
logits-only ONNX export of the same weights (what `torch.onnx.export` of the Hugging Face model gives).

    PYTHONPATH=. python benchmarks/attention_cost.py [--repeats 7] [--batch 8]

Targets (issue 2): classify path <= 1.05x the logits-only graph, attention path <= 1.25x. Runs are interleaved
and the medians compared, so machine noise hits every variant alike. Writes benchmarks/results/attention_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model_export.export import export_artifact
from model_export.from_hf import load_hf
from vit_artifact.attention import rollout
from vit_artifact.metadata import read_metadata

RESULTS = Path(__file__).parent / "results"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build(tmp: Path) -> tuple[Path, Path]:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()  # ViT-B/16, 224x224, random weights
    model.save_pretrained(tmp / "vit-b16")
    plain = tmp / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 224, 224),),
            str(plain),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    artifact = tmp / "artifact"
    export_artifact(load_hf(str(tmp / "vit-b16")), artifact, name="vit-b16")
    return plain, artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        plain, artifact = build(Path(tmp_name))
        meta = read_metadata(artifact)
        sessions = {
            "logits-only export": session(plain, args.threads),
            "classify path (model.onnx)": session(artifact / "model.onnx", args.threads),
            "attention path (attention.onnx + rollout)": session(artifact / "attention.onnx", args.threads),
        }
        x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)

        def run(name: str) -> None:
            outputs = sessions[name].run(None, {"pixel_values": x})
            if len(outputs) == 2:  # what the attention route does after the runtime call
                for a in outputs[1]:
                    rollout(a, num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)

        for name in sessions:
            run(name)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for name in sessions:
                t0 = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["logits-only export"])
    rows = []
    print(f"ViT-B/16, batch {args.batch}, median of {args.repeats} interleaved runs")
    print(f"{'path':45} {'ms/batch':>10} {'ms/image':>10} {'ratio':>7}")
    for name, t in times.items():
        m = statistics.median(t)
        rows.append(
            {
                "path": name,
                "median_ms": round(m * 1e3, 1),
                "ms_per_image": round(m * 1e3 / args.batch, 1),
                "ratio": round(m / base, 3),
            }
        )
        print(f"{name:45} {m * 1e3:10.1f} {m * 1e3 / args.batch:10.1f} {m / base:7.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_cost.json").write_text(
        json.dumps(
            {"model": "ViT-B/16 (HF, random init)", "batch": args.batch, "repeats": args.repeats, "rows": rows},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
