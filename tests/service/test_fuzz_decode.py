"""Fuzzing the image decode path and the V2 request codec: no crash, no hang, bounded memory.

Two fuzzers over the same targets (tests/fuzz/targets.py: `check_image`, `check_v2`; a `ServiceError` is the
right answer to bad bytes, anything else is a crash):

- atheris, coverage-guided, as a subprocess (tests/fuzz/harness.py) for a bounded time from a seed corpus of
  small valid files of every accepted format, with libFuzzer's `-timeout` (a hang fails) and `-rss_limit_mb`
  (runaway memory fails). A crash leaves its input under the test's tmp folder and in the failure message.
  `VITSERVE_FUZZ_SECONDS` sets the image target's time (the V2 target gets 40% of it); skipped without atheris.
- hypothesis, always: seeds mutated by byte flips, overwrites, cuts, insertions and integer splices (header
  fields are where decoders go wrong), a fixed number of examples, derandomized so a failure reproduces.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.imaging import decode_image
from service.errors import ServiceError
from tests.conftest import ROOT
from tests.fuzz.harness import write_seeds
from tests.fuzz.targets import MAX_PIXELS, check_image, check_v2, seed_images, seed_v2

HARNESS = ROOT / "tests" / "fuzz" / "harness.py"
IMAGE_SECONDS = int(os.environ.get("VITSERVE_FUZZ_SECONDS", "20"))
SECONDS = {"images": IMAGE_SECONDS, "v2": max(1, IMAGE_SECONDS * 2 // 5)}
HANG_SECONDS = 10  # one input taking longer than this is a hang (a seed decodes in about a millisecond)
MALLOC_LIMIT_MB = 1024  # one allocation above this is a memory blowup (a 1-megapixel decode needs a few MB)
# libFuzzer's RSS check reads ru_maxrss, which Linux carries over from the parent at fork: a child of a pytest
# process that has grown to 2 GB (torch, exports) starts "over" any tight limit. The RSS limit is therefore only
# a backstop; the per-allocation limit above is what catches an input that makes the decoder allocate too much.
RSS_LIMIT_MB = 8192
PROPERTY_EXAMPLES = 300
# Pillow warns about the damaged TIFF and EXIF data the mutations make, then goes on or raises; both are fine.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


def test_every_image_seed_decodes_and_preprocesses():
    # A seed that the decoder refused would only fuzz the refusal; each must go the whole way.
    for name, data in seed_images().items():
        try:
            decode_image(data, max_pixels=MAX_PIXELS)
        except ServiceError as e:
            pytest.fail(f"seed {name} is refused: {e.message}")
        check_image(data)


@pytest.mark.slow  # a fuzzing run of SECONDS[target] in a subprocess
@pytest.mark.parametrize("target", ["images", "v2"])
def test_atheris_finds_no_crash_hang_or_memory_blowup(tmp_path, target):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install -r requirements/dev.txt)")
    seeds = write_seeds(tmp_path / "seeds")[target]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [
        sys.executable,
        str(HARNESS),
        target,
        str(corpus),
        str(seeds),
        f"-max_total_time={SECONDS[target]}",
        f"-timeout={HANG_SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-malloc_limit_mb={MALLOC_LIMIT_MB}",
        "-max_len=16384",
        f"-dict={tmp_path / 'seeds' / f'{target}.dict'}",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SECONDS[target] + 120
    )
    output = result.stdout + result.stderr
    findings = sorted(p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    shown = "\n".join(f"{p.name}: {p.read_bytes()[:256].hex()}" for p in findings)
    assert result.returncode == 0 and not findings, f"{shown}\n{output[-6000:]}"
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", output).group(1))  # type: ignore[union-attr]
    print(f"\natheris {target}: {runs} inputs in {SECONDS[target]} s, no crash")
    assert runs > 100 * SECONDS[target]  # it really fuzzed (thousands per second; hundreds on a slow box)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "overwrite", "cut", "insert", "integer"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:  # a width, height, length or count field set to an extreme
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), value)
    return bytes(data)


PROPERTY = settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(data=mutated(list(seed_images().values())))
def test_mutated_images_decode_or_get_a_client_error(data):
    check_image(data)


@PROPERTY
@given(data=mutated(list(seed_v2().values())) | st.binary(max_size=512))
def test_mutated_v2_requests_parse_or_get_a_client_error(data):
    check_v2(data)
