"""The Makefile: every target it declares does something, `make help` lists them, and the set-up commands run
what they always ran. Dry runs (`make -n`): nothing is built or started."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

MAKEFILE = (ROOT / "Makefile").read_text()
PHONY = re.findall(r"^\.PHONY:(.*)$", MAKEFILE, re.MULTILINE)[0].split()

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args: str) -> str:
    run = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def rule(target: str) -> str | None:
    """The target's rule line and recipe, or None where the Makefile has no rule for it."""
    found = re.search(rf"^{re.escape(target)}:(?!=).*\n(?:\t.*\n)*", MAKEFILE, re.MULTILINE)
    return found.group(0) if found else None


@pytest.mark.parametrize("target", PHONY)
def test_every_declared_target_has_a_rule(target: str) -> None:
    # A name in .PHONY with no rule is a target that exits 0 having done nothing.
    body = rule(target)
    assert body is not None, f"`make {target}` is declared .PHONY but has no rule"
    prerequisites = body.split("\n")[0].split(":", 1)[1].split("##")[0].split()
    assert "\n\t" in body or prerequisites, f"`make {target}` has neither a recipe nor prerequisites"


def test_help_lists_the_targets_one_line_each() -> None:
    listed = dict(line.split(None, 1) for line in make("help").splitlines())
    described = [t for t in PHONY if "## " in (rule(t) or "").split("\n")[0]]
    assert list(listed) == sorted(described, key=lambda t: MAKEFILE.index(rule(t) or t)) and all(listed.values())
    for target in ("serve", "test", "test-fast", "lint", "typecheck", "bench", "help"):
        assert target in listed, f"`make help` does not list {target}"


def test_typecheck_and_bench_run_their_tools() -> None:
    assert make("-n", "typecheck").splitlines()[-1].endswith("/bin/python -m mypy")
    assert make("-n", "lint").splitlines()[-1].endswith("/bin/python -m mypy")  # the same check
    assert make("-n", "bench").splitlines()[-1].endswith("benchmarks/serving.py --quick --out build/bench")
    assert make("-n", "bench", "BENCH_OUT=benchmarks/results").splitlines()[-1].endswith("--out benchmarks/results")


def test_serve_and_test_run_as_before() -> None:
    serve = make("-n", "serve").splitlines()[-1]
    environment = r"PYTHONPATH=\S+ PYTHONDONTWRITEBYTECODE=1 VITSERVE_EXIT_WITH_PARENT=1"
    assert re.fullmatch(rf"exec env {environment} \S+/venv-serve-\S+/bin/python -m service", serve), serve
    assert make("-n", "test").splitlines()[-1].rstrip().endswith("/bin/python -m pytest -q")
