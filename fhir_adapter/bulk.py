"""Bulk Data ``$export`` client (FHIR Bulk Data Access IG, v2): whole cohorts as NDJSON.

Kick-off with ``Prefer: respond-async`` at system, Patient or Group level; poll the
``Content-Location`` status URL, honouring ``Retry-After`` with backoff; read the
manifest; download every output file to disk (with the bearer token when the manifest
says ``requiresAccessToken``); or cancel with DELETE. The downloaded folder, with a
``manifest.json`` whose URLs are local file names, is read by ``files.ExportReader``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from fhir_adapter.client import FhirClient, origin
from fhir_adapter.errors import FhirTimeout, FhirUpstreamError

ExportLevel = Literal["system", "patient", "group"]
_NDJSON = "application/fhir+ndjson"


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One output file of an export: its resource type and where to fetch it."""

    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True, slots=True)
class ExportManifest:
    """The completed export, as the status endpoint reported it."""

    transaction_time: str
    request: str
    requires_access_token: bool
    output: tuple[ExportFile, ...]
    error: tuple[ExportFile, ...]
    raw: dict[str, Any]


class BulkExportClient:
    """Runs exports through a ``FhirClient`` (its auth, retries and error mapping)."""

    def __init__(
        self, client: FhirClient, *, poll_interval: float = 1.0, poll_max: float = 60.0
    ) -> None:
        self.client = client
        self.poll_interval = poll_interval
        self.poll_max = poll_max

    async def kickoff(
        self,
        level: ExportLevel = "system",
        *,
        group_id: str | None = None,
        types: Sequence[str] = (),
        since: datetime | None = None,
    ) -> str:
        """Start an export; returns the status URL to poll."""
        if level == "group" and not group_id:
            raise ValueError("a group-level export needs group_id")
        path = {"system": "$export", "patient": "Patient/$export"}.get(
            level, f"Group/{group_id}/$export"
        )
        params = {"_outputFormat": _NDJSON}
        if types:
            params["_type"] = ",".join(types)
        if since is not None:
            params["_since"] = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        response = await self.client.request(
            "GET",
            path,
            params=params,
            headers={"Prefer": "respond-async"},
            expect=frozenset({202}),
        )
        location = response.headers.get("Content-Location")
        if not location:
            raise FhirUpstreamError(
                "export kick-off gave no Content-Location", url=str(response.url)
            )
        return str(location)

    async def wait(self, status_url: str, *, timeout: float = 600.0) -> ExportManifest:
        """Poll until the export completes; FhirTimeout after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = self.poll_interval
        while True:
            response = await self.client.request("GET", status_url, expect=frozenset({200, 202}))
            if response.status_code == 200:
                return _manifest(response.json())
            retry_after = response.headers.get("Retry-After", "")
            wait = float(retry_after) if retry_after.isdigit() else delay
            delay = min(delay * 2, self.poll_max)
            if time.monotonic() + wait > deadline:
                raise FhirTimeout(f"export not complete after {timeout:.0f} s", url=status_url)
            await asyncio.sleep(min(wait, self.poll_max))

    async def cancel(self, status_url: str) -> None:
        """Ask the server to stop the export and delete its files."""
        await self.client.request("DELETE", status_url, expect=frozenset({200, 202, 204}))

    async def download(self, manifest: ExportManifest, folder: Path) -> Path:
        """Fetch every output file into ``folder`` and write a local ``manifest.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        seen: Counter[str] = Counter()
        local: list[dict[str, Any]] = []
        for item in manifest.output:
            seen[item.type] += 1
            name = f"{item.type}.{seen[item.type]}.ndjson"
            await self._fetch(item.url, folder / name, manifest.requires_access_token)
            local.append({"type": item.type, "url": name})
        doc = {**manifest.raw, "output": local}
        (folder / "manifest.json").write_text(json.dumps(doc, indent=2))
        return folder

    async def export(
        self,
        folder: Path,
        level: ExportLevel = "system",
        *,
        group_id: str | None = None,
        types: Sequence[str] = (),
        since: datetime | None = None,
        timeout: float = 600.0,
    ) -> ExportManifest:
        """Kick off, wait and download in one call."""
        status_url = await self.kickoff(level, group_id=group_id, types=types, since=since)
        manifest = await self.wait(status_url, timeout=timeout)
        await self.download(manifest, folder)
        return manifest

    async def _fetch(self, url: str, target: Path, with_token: bool) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise FhirUpstreamError("export file URL is not http(s)", url=url)
        if with_token and origin(url) != origin(self.client.base_url):
            # A token for the FHIR server must not travel to another host.
            raise FhirUpstreamError("export file is on another origin than the server", url=url)
        await self.client.download(url, target, authorised=with_token, headers={"Accept": _NDJSON})


def _manifest(doc: Any) -> ExportManifest:
    if not isinstance(doc, dict) or not isinstance(doc.get("output"), list):
        raise FhirUpstreamError("export status returned no manifest")

    def files(key: str) -> tuple[ExportFile, ...]:
        return tuple(
            ExportFile(type=str(o.get("type")), url=str(o.get("url")), count=o.get("count"))
            for o in doc.get(key) or []
            if isinstance(o, dict) and o.get("url")
        )

    return ExportManifest(
        transaction_time=str(doc.get("transactionTime", "")),
        request=str(doc.get("request", "")),
        requires_access_token=bool(doc.get("requiresAccessToken", False)),
        output=files("output"),
        error=files("error"),
        raw=doc,
    )
