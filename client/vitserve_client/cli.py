"""The `vitserve-client` command (also `python -m vitserve_client`).

    vitserve-client classify digit.png photos/ --top-k 3        # a folder means its image files
    vitserve-client classify photos/ --json --concurrency 8     # JSON lines, one per image, in order
    vitserve-client attention digit.png -o overlay.png --method layer --layer -1 --head 2
    vitserve-client attention digit.png --method relevance --target 7
    vitserve-client attention digit.png --json                  # the map as JSON
    vitserve-client attention digits/ --json                    # several images in one batch request
    vitserve-client models
    vitserve-client --url http://gpu-box:8000 health

Exit codes: 0 ok; 1 some images failed (bad input: the server answered 4xx, or a file could not be read);
2 usage error; 3 server unavailable (no connection, 503 after the retries, or the URL answers but not as a vitserve
server); 141 (128 + SIGPIPE) when whoever reads the output stops early (`| head`), quietly, as other commands do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from vitserve_client._core import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, DEFAULT_URL, BaseClient, check_base_url
from vitserve_client._images import IMAGE_SUFFIXES
from vitserve_client._version import __version__
from vitserve_client.client import AsyncClient, Client
from vitserve_client.errors import APIError, OverloadedError, TransportError, UnexpectedResponseError, VitserveError
from vitserve_client.models import ClassifyResponse, Prediction

OK, FAILED, USAGE, UNAVAILABLE = 0, 1, 2, 3
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command that SIGPIPE ended (`yes | head -1`)
URL_HINT = "pass --url or set VITSERVE_URL"
C = TypeVar("C", bound=BaseClient)
SHADES = " .:-=+*#%@"  # the text rendering of an attention grid, weakest to strongest


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; below the command they default to SUPPRESS, so that a subparser
    # does not overwrite a value given before it. So the help texts spell the defaults out: a subcommand's
    # `%(default)s` would be SUPPRESS's, and its --help would fail.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("server")
    group.add_argument("--url", default=default(None), help=f"server URL (default: $VITSERVE_URL or {DEFAULT_URL})")
    group.add_argument("--api-key", default=default(None), help="API key (default: $VITSERVE_API_KEY)")
    group.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        help=f"seconds to connect, and to wait for each answer (default: {DEFAULT_TIMEOUT:g}); a connection not made "
        "in time is retried, a late answer is not",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=default(DEFAULT_MAX_RETRIES),
        help=f"retries after a failed connection or a 503 (default: {DEFAULT_MAX_RETRIES})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitserve-client",
        description="Classify images and draw attention maps with a vitserve server.",
        epilog="exit codes: 0 ok, 1 some images failed, 2 usage error, 3 server unavailable",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="top-k predictions for images and folders of images")
    classify.add_argument("images", nargs="+", metavar="IMG", help="image files, or folders of them")
    classify.add_argument("--top-k", type=_positive_int, help="predictions per image (default: the server's, 5)")
    classify.add_argument("--model", help="model name (default: the server's default model)")
    classify.add_argument("--json", action="store_true", help="JSON lines, one per image, instead of a table")
    classify.add_argument(
        "--concurrency", type=_positive_int, default=4, help="requests in flight at once (default: 4)"
    )
    classify.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    _connection_options(classify, top=False)

    attention = commands.add_parser(
        "attention",
        help="attention maps: a PNG overlay or JSON grid of one image; several images (or a folder) in one "
        "batch request",
    )
    attention.add_argument("images", nargs="+", metavar="IMG", help="image files, or folders of them")
    attention.add_argument("-o", "--output", type=Path, help="write the PNG overlay here (one image only)")
    attention.add_argument("--json", action="store_true", help="print the map as JSON (JSON lines for several)")
    attention.add_argument("--model", help="model name (default: the server's default model)")
    attention.add_argument("--method", choices=["rollout", "cls", "layer", "relevance"], default="rollout")
    attention.add_argument("--layer", type=int, help="layer for --method layer (negative counts from the end)")
    attention.add_argument("--head", type=int, help="head for --method layer (default: heads fused)")
    attention.add_argument("--head-fusion", choices=["mean", "max", "min"], help="how heads combine")
    attention.add_argument("--discard-ratio", type=float, help="rollout: drop this fraction of weak attention")
    attention.add_argument(
        "--target", help="relevance: the class to explain, an index or a label (default: the top prediction)"
    )
    attention.add_argument("--alpha", type=float, help="overlay opacity in [0, 1]")
    _connection_options(attention, top=False)

    models = commands.add_parser("models", help="the models the server has loaded")
    models.add_argument("--json", action="store_true")
    _connection_options(models, top=False)

    health = commands.add_parser("health", help="whether the server is up and its models are ready")
    health.add_argument("--json", action="store_true")
    _connection_options(health, top=False)
    return parser


def expand_images(arguments: Sequence[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive); ValueError for a bad argument."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {argument} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise ValueError(f"no such file or folder: {argument}")
    return paths


class Progress:
    """A one-line progress bar on stderr, redrawn in place."""

    def __init__(self, total: int, *, stream: TextIO, enabled: bool, width: int = 30) -> None:
        self.total, self.stream, self.enabled, self.width = total, stream, enabled, width
        self.done = self.failed = 0

    def advance(self, *, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.enabled:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "-" * (self.width - filled)
            failures = f"  {self.failed} failed" if self.failed else ""
            self.stream.write(f"\r[{bar}] {self.done}/{self.total}{failures}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _unavailable(error: BaseException) -> bool:
    """No vitserve server to talk to: no connection, overloaded through the retries, or something else answered."""
    return isinstance(error, (TransportError, OverloadedError, UnexpectedResponseError))


def _exit_code(errors: Sequence[BaseException]) -> int:
    if any(_unavailable(e) for e in errors):
        return UNAVAILABLE
    return FAILED if errors else OK


def _connect(cls: type[C], args: argparse.Namespace) -> C:
    client = cls(args.url, args.api_key, timeout=args.timeout, max_retries=args.max_retries)
    client._url_hint = URL_HINT  # errors name the option a command-line user has, not the SDK's argument
    return client


def _error_dict(error: BaseException) -> dict[str, Any]:
    if isinstance(error, APIError):
        return error.to_dict()
    if isinstance(error, TransportError):
        kind = "unavailable"
    elif isinstance(error, VitserveError):
        kind = "unexpected_response"
    else:
        kind = "unreadable"  # the file could not be read
    return {"code": kind, "message": str(error)}


async def classify_all(
    paths: Sequence[Path], args: argparse.Namespace, progress: Progress
) -> list[ClassifyResponse | BaseException]:
    """Classify `paths` with at most `args.concurrency` requests in flight; one outcome per path, in order."""
    gate = asyncio.Semaphore(args.concurrency)
    down: BaseException | None = None  # once the server is unavailable, the rest fail fast with the same error

    async with _connect(AsyncClient, args) as client:

        async def one(path: Path) -> ClassifyResponse | BaseException:
            nonlocal down
            async with gate:
                outcome: ClassifyResponse | BaseException
                if down is not None:
                    outcome = down
                else:
                    try:
                        outcome = await client.classify(path, model=args.model, top_k=args.top_k)
                    except (VitserveError, OSError) as e:  # OSError: the file vanished or is unreadable
                        outcome = e
                        if _unavailable(e):
                            down = e
            progress.advance(failed=not isinstance(outcome, ClassifyResponse))
            return outcome

        return list(await asyncio.gather(*(one(p) for p in paths)))


def _print_classify(paths: Sequence[Path], outcomes: Sequence[Any], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        for path, outcome in zip(paths, outcomes, strict=True):
            record: dict[str, Any] = {"image": str(path)}
            if isinstance(outcome, ClassifyResponse):
                record.update(outcome.model_dump(mode="json"))
            else:
                record["error"] = _error_dict(outcome)
            out.write(json.dumps(record) + "\n")
        return
    width = max(len("IMAGE"), *(len(str(p)) for p in paths))
    out.write(f"{'IMAGE':<{width}}  {'LABEL':<12}  {'PROB':>6}  OTHERS\n")
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, ClassifyResponse):
            top, *rest = outcome.predictions
            others = ", ".join(f"{p.label} {p.probability:.3f}" for p in rest)
            out.write(f"{path!s:<{width}}  {top.label:<12}  {top.probability:>6.3f}  {others}\n")
        else:
            error = _error_dict(outcome)
            message = error["message"] if len(error["message"]) <= 100 else error["message"][:99] + "…"
            out.write(f"{path!s:<{width}}  {'error':<12}  {'':>6}  {error['code']}: {message}\n")


def run_classify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        paths = expand_images(args.images)
    except ValueError as e:
        parser.error(str(e))
    enabled = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(len(paths), stream=sys.stderr, enabled=enabled)
    try:
        outcomes = asyncio.run(classify_all(paths, args, progress))
    finally:
        progress.close()
    wrong = next((o for o in outcomes if isinstance(o, UnexpectedResponseError)), None)
    if wrong is not None:  # not a vitserve server: one message, not a table of the same error per image
        sys.stderr.write(f"vitserve-client: {wrong}\n")
        return UNAVAILABLE
    _print_classify(paths, outcomes, as_json=args.json, out=sys.stdout)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        sys.stderr.write(f"{len(errors)} of {len(paths)} images failed\n")
    down = next((e for e in errors if _unavailable(e)), None)
    if down is not None:
        sys.stderr.write(f"server unavailable: {down}\n")
    return _exit_code(errors)


def render_grid(grid: Sequence[Sequence[float]]) -> str:
    """The attention grid as text, two characters per cell so that it looks square."""
    top = len(SHADES) - 1
    return "\n".join("".join(SHADES[round(min(max(v, 0.0), 1.0) * top)] * 2 for v in row) for row in grid)


def _what(method: str, target: Prediction | None) -> str:
    """What a map shows, in words: "rollout attention", or "relevance for 7"."""
    return f"relevance for {target.label}" if target is not None else f"{method} attention"


def run_attention(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        paths = expand_images(args.images)
    except ValueError as e:
        parser.error(str(e))
    params = {
        "model": args.model,
        "method": args.method,
        "layer": args.layer,
        "head": args.head,
        "head_fusion": args.head_fusion,
        "discard_ratio": args.discard_ratio,
        "target": args.target,
    }
    if len(args.images) > 1 or len(paths) > 1 or Path(args.images[0]).is_dir():
        if args.output is not None or args.alpha is not None:
            parser.error("-o/--alpha draw one image's overlay; several images come back as maps (--json or text)")
        return _attention_batch(paths, params, args)
    image = paths[0]
    with _connect(Client, args) as client:
        if args.output is not None:
            png = client.attention(image, **params, format="png", alpha=args.alpha)
            png.save(args.output)
            sys.stderr.write(f"wrote {args.output} ({len(png.data)} bytes)\n")
        if args.json or args.output is None:
            result = client.attention(image, **params)
            if args.json:
                sys.stdout.write(result.model_dump_json() + "\n")
            else:
                top = result.predictions[0]
                sys.stdout.write(f"{image}: {_what(result.method, result.target)}, prediction {top.label} ")
                sys.stdout.write(f"({top.probability:.3f}), {result.grid.height}x{result.grid.width} grid\n")
                sys.stdout.write(render_grid(result.map) + "\n")
    return OK


def _attention_batch(paths: Sequence[Path], params: dict[str, Any], args: argparse.Namespace) -> int:
    """Several images' maps in one request (`attention_batch`): JSON lines or text grids, one per image, in order."""
    with _connect(Client, args) as client:
        batch = client.attention_batch(paths, **params)
    for path, item in zip(paths, batch.results, strict=True):
        if args.json:
            record = {"image": str(path), "method": batch.method, "params": batch.params.model_dump(mode="json")}
            record.update(item.model_dump(mode="json", exclude={"index", "filename"}))
            sys.stdout.write(json.dumps(record) + "\n")
        elif item.error is not None or item.map is None or not item.predictions:
            message = item.error.message if item.error else "no result"
            sys.stdout.write(f"{path}: error {item.error.code if item.error else ''}: {message}\n")
        else:
            top = item.predictions[0]
            what = _what(batch.method, item.target)
            sys.stdout.write(f"{path}: {what}, prediction {top.label} ({top.probability:.3f})\n")
            sys.stdout.write(render_grid(item.map) + "\n")
    failed = sum(not item.ok for item in batch.results)
    if failed:
        sys.stderr.write(f"{failed} of {len(paths)} images failed\n")
    return FAILED if failed else OK


def run_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    with _connect(Client, args) as client:
        listing = client.models()
    if args.json:
        sys.stdout.write(listing.model_dump_json() + "\n")
        return OK
    rows = [("NAME", "VERSION", "PRECISION", "LABELS", "INPUT", "GRID", "LAYERS", "HEADS", "PROVIDER")]
    for m in listing.models:
        name = f"{m.name} (default)" if m.default else m.name
        size = f"{m.input_size[0]}x{m.input_size[1]}"
        grid = f"{m.grid.height}x{m.grid.width}"
        rows.append(
            (name, m.version, m.precision, str(m.labels_count), size, grid, str(m.layers), str(m.heads), m.provider)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return OK


def run_health(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    with _connect(Client, args) as client:
        health = client.ready()
    if args.json:
        sys.stdout.write(health.model_dump_json() + "\n")
    else:
        models = ", ".join(f"{name} {'ready' if ready else 'loading'}" for name, ready in health.models.items())
        sys.stdout.write(f"{health.status}" + (f" ({models})" if models else "") + "\n")
    return OK if health.ok else UNAVAILABLE


COMMANDS = {"classify": run_classify, "attention": run_attention, "models": run_models, "health": run_health}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here rather than at exit, so that a reader gone away is handled below
    except BrokenPipeError:
        # The reader stopped early (`| head`): what it wanted is written. Quietly, as other commands: stdout now
        # goes nowhere, so the flush at exit cannot fail again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_retries < 0:
        parser.error("--max-retries must be >= 0")
    try:
        if args.url:
            args.url = check_base_url(args.url, name="--url")
        elif os.environ.get("VITSERVE_URL"):
            check_base_url(os.environ["VITSERVE_URL"], name="$VITSERVE_URL")
    except ValueError as e:
        parser.error(str(e))
    try:
        return COMMANDS[args.command](args, parser)
    except VitserveError as e:
        sys.stderr.write(f"vitserve-client: {e}\n")
        return UNAVAILABLE if _unavailable(e) else FAILED
    except BrokenPipeError:
        raise  # handled by main
    except OSError as e:  # the image or the output file could not be read or written
        sys.stderr.write(f"vitserve-client: {e}\n")
        return FAILED
    except KeyboardInterrupt:
        return 130
