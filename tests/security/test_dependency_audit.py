"""Known vulnerabilities in the project's dependencies, checked on every CI run.

The audited set is what the project needs, runtime and ``dev`` extras, followed through
every installed distribution's requirements, at the versions installed (pip among them:
pip-audit needs it, which is why ``dev`` asks for a pip newer than the one venv installs).

``pip-audit`` asks PyPI's JSON API for each pinned version. Where PyPI answers only for a
project's newest release (the package mirror this project's machines and CI reach has no
per-version pages), pip-audit skips the dependency, and the test reads the project page
instead: its ``vulnerabilities`` are those of the newest release, so they are ours when we
run that release. A dependency audited neither way is reported as a warning, not hidden.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "ehrmamba-fhir"
EXTRAS = frozenset({"dev"})
# Vulnerability id -> why no version bump fixes it. Empty: every known one is fixed.
IGNORED: dict[str, str] = {}
PYPI = "https://pypi.org/pypi/{}/json"
AUDIT_TIMEOUT_S = 240


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    ids: tuple[str, ...]
    fixed_in: tuple[str, ...]


def project_dependencies() -> dict[str, str]:
    """Installed version of every distribution the project needs, by canonical name."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[str, frozenset[str]]] = [(PROJECT, EXTRAS)]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            wanted = extras or frozenset({""})
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    del found[PROJECT]
    return found


def _public(version: str) -> str:
    """The version PyPI knows (``2.13.0`` for a local ``2.13.0+cpu`` build)."""
    return Version(version).public


def _pip_audit(pins: dict[str, str], folder: Path) -> tuple[list[Finding], set[str]]:
    """pip-audit over the exact pins: its findings, and the packages it had to skip."""
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{n}=={_public(v)}\n" for n, v in sorted(pins.items())))
    command = [
        sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--no-deps",
        "--disable-pip", "--format", "json", "--progress-spinner", "off", "--timeout", "30",
        *(arg for vuln in IGNORED for arg in ("--ignore-vuln", vuln)),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=AUDIT_TIMEOUT_S)
    assert run.returncode in (0, 1), run.stderr  # 1: vulnerabilities found
    findings: list[Finding] = []
    skipped: set[str] = set()
    for dep in json.loads(run.stdout)["dependencies"]:
        name = canonicalize_name(dep["name"])
        if "skip_reason" in dep:
            skipped.add(name)
        for vuln in dep.get("vulns", []):
            ids = (vuln["id"], *vuln.get("aliases", []))
            findings.append(Finding(name, dep["version"], ids, tuple(vuln["fix_versions"])))
    return findings, skipped


async def _newest_release_audit(
    pins: dict[str, str], names: set[str]
) -> tuple[list[Finding], list[str]]:
    """For packages pip-audit skipped: the project page's vulnerabilities where we run the
    newest release; the others are returned as not audited."""
    findings: list[Finding] = []
    unaudited: list[str] = []
    limit = asyncio.Semaphore(8)

    async def one(client: httpx.AsyncClient, name: str) -> None:
        async with limit:
            response = await client.get(PYPI.format(name))
        response.raise_for_status()
        page = response.json()
        if Version(page["info"]["version"]) != Version(_public(pins[name])):
            unaudited.append(f"{name} {pins[name]} (newest {page['info']['version']})")
            return
        for vuln in page.get("vulnerabilities") or []:
            if vuln.get("withdrawn") is None:
                ids = (vuln["id"], *vuln.get("aliases", []))
                findings.append(Finding(name, pins[name], ids, tuple(vuln["fixed_in"])))

    async with httpx.AsyncClient(timeout=60, follow_redirects=True) as client:
        await asyncio.gather(*(one(client, name) for name in sorted(names)))
    return findings, sorted(unaudited)


def test_the_dependency_set_is_the_projects_own() -> None:
    """The walk finds runtime and dev dependencies and theirs, but not the project."""
    pins = project_dependencies()
    assert {"fastapi", "torch", "pyjwt", "schemathesis", "pip-audit"} <= set(pins)
    assert {"starlette", "cryptography", "pip"} <= set(pins)  # through the ones above
    assert PROJECT not in pins


async def test_no_dependency_has_a_known_vulnerability(tmp_path: Path) -> None:
    pins = project_dependencies()
    findings, skipped = await asyncio.to_thread(_pip_audit, pins, tmp_path)
    more, unaudited = await _newest_release_audit(pins, skipped)
    known = [f for f in [*findings, *more] if not set(f.ids) & set(IGNORED)]
    assert not known, "\n".join(
        f"{f.package} {f.version}: {', '.join(f.ids)} (fixed in {', '.join(f.fixed_in) or '-'})"
        for f in known
    )
    if unaudited:
        warnings.warn(
            f"not audited (PyPI answered for neither this version nor, being older, the "
            f"newest): {'; '.join(unaudited)}",
            stacklevel=1,
        )
