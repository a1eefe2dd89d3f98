"""pip-audit over the pinned requirements: a known vulnerability fails the suite unless it is accepted, with a
reason, in security/audit-ignore.txt.

pip-audit needs a vulnerability database: PyPI's JSON API (`/pypi/<name>/<version>/json`) or OSV (api.osv.dev).
Each is first asked about a canary, pillow 9.0.0, which has dozens of published advisories: a service that does
not report it is not really answering. That covers being offline, and also a PyPI mirror without the
per-version JSON, where pip-audit reports every package "not found", finds nothing and exits 0: a silent pass.
With no service answering the test skips and says why, so a network outage never fails CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

REQUIREMENTS = ["serve.txt", "dev.txt"]
ACCEPTED = ROOT / "security" / "audit-ignore.txt"
SERVICES = ("pypi", "osv")
CANARY = "pillow==9.0.0"


def audit(requirements: Path, service: str) -> dict[str, Any]:
    """pip-audit's JSON report for a fully pinned requirements file (no resolution, nothing installed)."""
    command = [sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--no-deps", "--disable-pip"]
    command += ["--format", "json", "--aliases", "on", "--progress-spinner", "off", "--timeout", "20"]
    command += ["--vulnerability-service", service]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}


def accepted() -> dict[str, tuple[str, str]]:
    """Advisory id -> (package, reason), from security/audit-ignore.txt."""
    entries = {}
    for number, line in enumerate(ACCEPTED.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(maxsplit=2)
        assert len(fields) == 3, f"{ACCEPTED.name}:{number}: want '<id> <package> <reason>', got {line!r}"
        entries[fields[0]] = (fields[1], fields[2])
    return entries


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("pip_audit", reason="pip-audit is not installed (pip install -r requirements/dev.txt)")
    canary = tmp_path_factory.mktemp("audit") / "canary.txt"
    canary.write_text(CANARY + "\n")
    reasons = []
    for name in SERVICES:
        report = audit(canary, name)
        dependencies = report.get("dependencies") or [{}]
        if dependencies[0].get("vulns"):
            return name
        reasons.append(f"{name}: {dependencies[0].get('skip_reason') or report.get('error') or 'reports no advisory'}")
    pytest.skip(f"no vulnerability database answers for the canary {CANARY}: " + "; ".join(reasons))


def test_every_accepted_finding_has_a_reason():
    for advisory, (package, reason) in accepted().items():
        assert advisory.startswith(("PYSEC-", "GHSA-", "CVE-", "OSV-")), advisory
        assert package and len(reason) > 20, f"{advisory}: say why it is accepted"


@pytest.mark.slow  # pip-audit asks PyPI or OSV about every pin
@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_no_known_vulnerability_that_is_not_accepted(service, requirements):
    report = audit(ROOT / "requirements" / requirements, service)
    assert "dependencies" in report, report
    allowed = accepted()
    findings, skipped = [], []
    for dependency in report["dependencies"]:
        if "skip_reason" in dependency:
            skipped.append(dependency["skip_reason"])
        for vuln in dependency.get("vulns", []):
            if not {vuln["id"], *vuln.get("aliases", [])} & allowed.keys():
                fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix released"
                findings.append(f"{dependency['name']}=={dependency['version']}: {vuln['id']} (fixed in {fixes})")
    if skipped:
        warnings.warn(f"{len(skipped)} pins could not be audited: {skipped[:5]}", stacklevel=1)
    assert not findings, (
        f"requirements/{requirements}: move each pin past the fix, or accept the finding in "
        f"security/{ACCEPTED.name} with a reason:\n  " + "\n  ".join(findings)
    )
