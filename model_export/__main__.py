"""`python -m model_export` (or `vitserve-export`): turn a trained ViT into a verified vitserve artifact.

    python -m model_export train-default --out models/digits-vit
    python -m model_export hf ./my-vit-checkpoint --out models/my-vit --int8
    python -m model_export timm vit_base_patch16_224 --checkpoint vit.pth --num-classes 10 --out models/vit
    python -m model_export own checkpoint.pt --out models/mine
    python -m model_export add-relevance models/digits-vit

Exit codes: 0 exported and verified; 2 bad input (missing or corrupt checkpoint, unsupported model, labels);
3 parity failed (the ONNX graph does not compute what the source model does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from vit_artifact.metadata import ArtifactMetadata, Calibration

from .sources import ExportError, ExportSource, ParityError, Tolerance

if TYPE_CHECKING:
    from .variants import CalibrationSet

log = logging.getLogger("model_export")

EXIT_BAD_INPUT = 2
EXIT_PARITY = 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write (e.g. models/my-vit)")
    p.add_argument("--name", help="model name the service uses (default: the --out directory's name)")
    p.add_argument("--version", default="1", help="model version recorded in the artifact")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--atol", type=float, default=Tolerance.atol, help="absolute part of every parity tolerance")
    p.add_argument(
        "--rtol",
        type=float,
        default=Tolerance.rtol,
        help="relative part: every parity gate allows max |diff| <= atol + rtol * max |reference logit|",
    )
    p.add_argument(
        "--rounding-factor",
        type=float,
        default=Tolerance.rounding,
        help="the ONNX gate also allows this many times the source's own float32 rounding (vs float64)",
    )
    p.add_argument(
        "--int8", action="store_true", help="also write an INT8 variant, <out>-int8 (dynamic: served unbatched)"
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="static INT8 (batch-invariant, batched in the service): fix activation scales from the images in DIR, "
        "like those the model will serve (train-default: its training canvases unless given)",
    )
    p.add_argument(
        "--calibrate",
        choices=get_args(Calibration),
        help="static INT8 calibration method (default minmax); implies static INT8",
    )
    p.add_argument("--fp16", action="store_true", help="also write an FP16 variant for CUDA, <out>-fp16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-default", help="train the default digits ViT here, then export it")
    _common(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        choices=["default", "large"],
        default="default",
        help="default: the committed digits model; large: a width-192 ViT on the same data, where INT8 pays",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tuned setting)")
    p.add_argument("--checkpoint", type=Path, help="where to save the PyTorch checkpoint (default: <out>.pt)")

    p = sub.add_parser("hf", help="a transformers ViT/DeiT saved with save_pretrained (or a hub id)")
    p.add_argument("source", help="directory written by save_pretrained, or a hub id where the network allows")
    p.add_argument("--labels", help="label file (one per line, or JSON); default: the config's id2label")
    _common(p)

    p = sub.add_parser("timm", help="a timm vit_*/deit_* model and its checkpoint file")
    p.add_argument("model_name", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--checkpoint", help="state-dict file (.pth/.bin/.safetensors); omit only for random weights")
    p.add_argument("--num-classes", type=int, help="classes in the head (default: read from the checkpoint)")
    p.add_argument("--labels", help="label file, one per line (or JSON); default: class indices")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture argument for timm.create_model where the checkpoint differs from the name's defaults "
        "(repeatable; VALUE is JSON, e.g. img_size=384 or depth=6)",
    )
    _common(p)

    p = sub.add_parser("own", help="a checkpoint of the project's own ViT (model_export.vit)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--labels", help="label file overriding the checkpoint's labels")
    _common(p)

    p = sub.add_parser(
        "add-relevance",
        help="add the relevance graph to an FP32 artifact of the project's own ViT, from the weights in its graphs",
    )
    p.add_argument("artifact", type=Path, help="artifact directory, e.g. models/digits-vit")
    p.add_argument("--atol", type=float, default=Tolerance.atol, help="absolute part of the parity tolerance")
    p.add_argument("--rtol", type=float, default=Tolerance.rtol, help="relative part of the parity tolerance")
    p.add_argument("--rounding-factor", type=float, default=Tolerance.rounding, help="times the float32 rounding")
    return parser


def _export(src: ExportSource, args: argparse.Namespace) -> ArtifactMetadata:
    from .export import export_artifact

    meta = export_artifact(
        src, args.out, name=args.name, version=args.version, opset=args.opset, tolerance=_tolerance(args)
    )
    p = meta.parity
    print(
        f"exported {meta.name} -> {args.out}: max |logit diff| {p.max_abs_logit_diff:.2e} "
        f"(tolerance {p.tolerance:.2e}), max |attention diff| {p.max_abs_attention_diff:.2e}, "
        f"top-1 agreement {p.top1_agreement:.3f}"
    )
    return meta


def _tolerance(args: argparse.Namespace) -> Tolerance:
    return Tolerance(atol=args.atol, rtol=args.rtol, rounding=args.rounding_factor)


def _calibration(
    args: argparse.Namespace, meta: ArtifactMetadata, default: Callable[[], CalibrationSet] | None = None
) -> CalibrationSet | None:
    """The static-INT8 calibration set the flags ask for, or None for dynamic INT8."""
    from .calibration import calibration_from_dir

    method: Calibration = args.calibrate or "minmax"
    if args.calibration is not None:
        return calibration_from_dir(args.calibration, meta.preprocessing, method)
    if args.calibrate is None:
        return None
    if default is None:
        raise ExportError("static INT8 (--calibrate) needs images like those the model will serve: --calibration DIR")
    return dataclasses.replace(default(), method=method)


def _variants(args: argparse.Namespace, meta: ArtifactMetadata, **kwargs: object) -> None:
    from .variants import make_variant

    for precision in ("int8", "fp16"):
        if getattr(args, precision):
            out = args.out.with_name(f"{args.out.name}-{precision}")
            v = make_variant(args.out, out, precision=precision, name=f"{meta.name}-{precision}", **kwargs)  # type: ignore[arg-type]
            summary = {
                k: v.parity.model_dump()[k]
                for k in ("top1_agreement", "speedup", "accuracy", "accuracy_delta_points", "passed")
            }
            mode = f" ({v.quantization.mode})" if v.quantization else ""
            print(f"{precision} variant{mode} -> {out}: {json.dumps(summary)}")


def _train_default(args: argparse.Namespace) -> None:
    from .calibration import training_calibration
    from .evaluate import classify_accuracy, held_out_inputs, score_digits
    from .from_own import load_own
    from .train import RECIPES, train_checkpoint

    settings = dataclasses.replace(
        RECIPES[args.size], seed=args.seed, **({"epochs": args.epochs} if args.epochs else {})
    )
    checkpoint = args.checkpoint or args.out.with_suffix(".pt")
    report = train_checkpoint(checkpoint, settings)
    meta = _export(load_own(checkpoint), args)
    score = score_digits(args.out)
    print(
        f"held-out ({score.n} canvases of digits never trained on): accuracy {score.accuracy:.2%}, "
        f"rollout pointing game {score.pointing_game:.2%}; trained in {report['train_seconds']} s"
    )
    _record_score(args.out, meta, {**score.as_dict(), **report})

    x, held = held_out_inputs(meta)
    calibration = _calibration(args, meta, default=lambda: training_calibration(meta.preprocessing))
    _variants(
        args,
        meta,
        inputs=x[:256],
        accuracy=lambda graph: classify_accuracy(graph, x, held.labels),
        calibration=calibration,
    )


def _record_score(directory: Path, meta: ArtifactMetadata, score: dict) -> None:
    from vit_artifact.metadata import write_metadata

    write_metadata(directory, meta.model_copy(update={"extra": {**meta.extra, **score}}))


def _model_args(pairs: list[str]) -> dict[str, object]:
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ExportError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. img_size=384")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value  # a bare word, e.g. global_pool=token
    return parsed


def _add_relevance(args: argparse.Namespace) -> None:
    from .from_artifact import add_relevance

    meta = add_relevance(args.artifact, tolerance=_tolerance(args))
    print(
        f"added the relevance graph to {args.artifact}: max |map diff| vs PyTorch autograd "
        f"{meta.parity.max_abs_relevance_diff:.2e} of the map's maximum"
    )


def run(args: argparse.Namespace) -> None:
    if args.command == "add-relevance":
        _add_relevance(args)
        return
    if args.command != "train-default" and args.calibrate and args.calibration is None:
        raise ExportError("static INT8 (--calibrate) needs images like those the model will serve: --calibration DIR")
    if (args.calibrate or args.calibration) and not args.int8:
        raise ExportError("--calibrate and --calibration make the INT8 variant static: add --int8")
    if args.command == "train-default":
        _train_default(args)
        return
    if args.command == "hf":
        from .from_hf import load_hf

        src = load_hf(args.source, labels_file=args.labels)
    elif args.command == "timm":
        from .from_timm import load_timm

        src = load_timm(
            args.model_name,
            model_kwargs=_model_args(args.model_arg),
            checkpoint=args.checkpoint,
            num_classes=args.num_classes,
            labels_file=args.labels,
            tolerance=_tolerance(args),
        )
    else:
        from .from_own import load_own

        src = load_own(args.checkpoint, labels_file=args.labels)
    meta = _export(src, args)
    _variants(args, meta, calibration=_calibration(args, meta))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args)
    except ParityError as e:
        print(f"error: parity check failed: {e}", file=sys.stderr)
        return EXIT_PARITY
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
