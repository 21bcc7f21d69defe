"""Load sample patients from files into a FHIR server, keeping their ids.

The compose stack's one-shot ``loader`` job runs this against HAPI (which may still be
creating its schema when the job starts, so it waits for ``/metadata`` first); the
no-Docker stack test runs it against the local FHIR server the same way:

    python deploy/load_samples.py --fhir http://hapi:8080/fhir --source /samples

The source is anything ``fhir_adapter.files.ExportReader`` reads: Bundle files, NDJSON,
Bulk Data export folders, tar archives of these, or a folder holding any mix of them.
Resources are PUT by id (``fhir_adapter.upload``), so running it again changes nothing
but the resources' versions. Exit status: 0 loaded, 1 nothing to load or the server
refused a write, 2 the source does not exist, 3 the server never became ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fhir_adapter.client import FHIR_JSON, FhirClient, FhirClientConfig
from fhir_adapter.errors import FhirError
from fhir_adapter.files import ExportReader
from fhir_adapter.upload import upload_record


class ServerNotReady(Exception):
    """The FHIR server did not answer ``/metadata`` with a CapabilityStatement in time."""


@dataclass
class LoadReport:
    """What was loaded, and what the reader could not use (counted by ``Type:reason``)."""

    source: str
    server: str
    waited_s: float = 0.0
    patients: int = 0
    resources: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skipped_types: Counter[str] = field(default_factory=Counter)
    skipped_files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [
            f"FHIR server {self.server} ready after {self.waited_s:.1f} s",
            f"loaded {self.patients} patients ({self.resources} resources) from {self.source}",
        ]
        if self.dropped:
            lines.append(f"dropped: {dict(sorted(self.dropped.items()))}")
        if self.skipped_types:
            lines.append(f"skipped types: {dict(sorted(self.skipped_types.items()))}")
        if self.skipped_files:
            lines.append(f"skipped files: {', '.join(self.skipped_files)}")
        return lines

    def as_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "server": self.server,
                "waited_s": round(self.waited_s, 3),
                "patients": self.patients,
                "resources": self.resources,
                "dropped": dict(self.dropped),
                "skipped_types": dict(self.skipped_types),
                "skipped_files": self.skipped_files,
            },
            sort_keys=True,
        )


async def wait_for_server(base_url: str, timeout: float, interval: float = 2.0) -> float:
    """Seconds until the server answered ``/metadata``; ServerNotReady after ``timeout``.

    HAPI answers connections (with 404s and 500s) well before its schema is ready, so only
    a CapabilityStatement counts as ready, not any answer."""
    started = time.monotonic()
    last = "no answer yet"
    async with httpx.AsyncClient(timeout=10.0, headers={"Accept": FHIR_JSON}) as http:
        while True:
            try:
                response = await http.get(f"{base_url.rstrip('/')}/metadata")
                if response.status_code == 200 and _is_capability_statement(response):
                    return time.monotonic() - started
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            if time.monotonic() - started >= timeout:
                raise ServerNotReady(f"{base_url} not ready after {timeout:.0f} s ({last})")
            await asyncio.sleep(interval)


def _is_capability_statement(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("resourceType") == "CapabilityStatement"


async def load(source: Path, base_url: str, *, wait_timeout: float, batch: int) -> LoadReport:
    """Wait for the server, then PUT every patient of ``source`` (one patient at a time,
    so a huge export never sits in memory)."""
    report = LoadReport(source=str(source), server=base_url)
    report.waited_s = await wait_for_server(base_url, wait_timeout)
    reader = ExportReader(source)
    # Generous timeout: a first transaction makes HAPI build its search indexes.
    config = FhirClientConfig(base_url=base_url, timeout=120.0)
    async with FhirClient(config) as client:
        for record in reader.records():
            report.resources += await upload_record(client, record, size=batch)
            report.patients += 1
            report.dropped.update(record.dropped)
    report.dropped.update(reader.stats.dropped)
    report.skipped_types.update(reader.stats.skipped_types)
    report.skipped_files.extend(reader.stats.skipped_files)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Load sample patients from files into a FHIR server, keeping their ids."
    )
    parser.add_argument("--fhir", required=True, help="FHIR base URL, e.g. http://hapi:8080/fhir")
    parser.add_argument("--source", required=True, type=Path, help="File or folder to load.")
    parser.add_argument(
        "--wait", type=float, default=300.0, help="Seconds to wait for the server (300)."
    )
    parser.add_argument("--batch", type=int, default=500, help="Entries per transaction (500).")
    parser.add_argument("--json", action="store_true", help="Print the report as one JSON line.")
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"no such sample file or folder: {args.source}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(load(args.source, args.fhir, wait_timeout=args.wait, batch=args.batch))
    except ServerNotReady as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except FhirError as exc:
        print(f"the FHIR server refused the samples: {exc}", file=sys.stderr)
        return 1
    print(report.as_json() if args.json else "\n".join(report.lines()), flush=True)
    if report.patients == 0:
        print(
            f"no patients found in {args.source}: put FHIR Bundles, NDJSON or an export "
            "there (docs/operations.md, 'Sample patients')",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
