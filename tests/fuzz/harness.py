"""Coverage-guided fuzzing (atheris, libFuzzer) of the image decode path and the V2 request codec.

    PYTHONPATH=. python tests/fuzz/harness.py images CORPUS_DIR [SEED_DIR ...] [libFuzzer flags]
    PYTHONPATH=. python tests/fuzz/harness.py v2 CORPUS_DIR [SEED_DIR ...] [libFuzzer flags]
    PYTHONPATH=. python tests/fuzz/harness.py seeds DIR    # write the seed corpora to DIR/images, DIR/v2

The targets and what counts as a crash are in tests/fuzz/targets.py. Pillow's plugins and the service's
modules are instrumented for coverage (numpy and the C decoders are not: their bugs show up as exceptions,
hangs or memory use, which libFuzzer's `-timeout` and `-rss_limit_mb` catch). A crash leaves the input in
`<artifact_prefix>crash-<sha1>`; replay it with `python tests/fuzz/harness.py images crash-<sha1>`.
tests/service/test_fuzz_decode.py runs both targets for a bounded time in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGETS = ("images", "v2")
# Tokens libFuzzer splices into inputs: the formats' signatures and chunk names, the protocol's keys.
# fmt: off
DICTIONARY = {
    "images": [
        b"\x89PNG\r\n\x1a\n", b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"eXIf", b"iCCP", b"acTL", b"fcTL",
        b"GIF87a", b"GIF89a", b"NETSCAPE2.0", b"\x21\xf9\x04", b"BM", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff",
        b"\xff\xc0", b"\xff\xc2", b"\xff\xe1", b"Exif\x00\x00", b"RIFF", b"WEBP", b"VP8 ", b"VP8L", b"VP8X",
        b"ANIM", b"ANMF", b"ALPH",
    ],
    "v2": [
        b'"inputs"', b'"outputs"', b'"shape"', b'"datatype"', b'"data"', b'"parameters"', b'"binary_data_size"',
        b'"binary_data"', b'"binary_data_output"', b'"classification"', b'"pixel_values"', b'"image"',
        b'"BYTES"', b'"FP32"', b'"FP16"', b'"UINT8"', b'"INT64"', b'"BOOL"', b"NaN", b"Infinity", b"-1",
        b"18446744073709551616",
    ],
}
# fmt: on


def write_seeds(directory: Path) -> dict[str, Path]:
    """The seed corpora and libFuzzer dictionaries under `directory`; target -> its seed folder."""
    from tests.fuzz.targets import seed_images, seed_v2

    folders = {}
    for target, seeds in (("images", seed_images()), ("v2", seed_v2())):
        folder = directory / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        tokens = "".join(f'"{_escape(token)}"\n' for token in DICTIONARY[target])
        (directory / f"{target}.dict").write_text(tokens)
        folders[target] = folder
    return folders


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in (*TARGETS, "seeds"):
        sys.exit(__doc__)
    target = sys.argv.pop(1)
    if target == "seeds":
        write_seeds(Path(sys.argv[1]))
        return

    import atheris

    with atheris.instrument_imports(include=["PIL", "service"]):
        from PIL import Image

        Image.init()  # import every plugin now, inside the hook: `_refused_format` runs their signature checks
        from tests.fuzz import targets

    atheris.Setup(sys.argv, targets.check_image if target == "images" else targets.check_v2)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
