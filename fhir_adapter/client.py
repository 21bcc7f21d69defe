"""An async FHIR R4 REST client: read, search with paging, a patient's whole record.

Behaviour a hospital integration engineer can rely on:
- Paging follows ``Bundle.link[next]`` exactly as the server gave it (HAPI's links are
  opaque), only on the server's own origin, and stops on a repeated link.
- 429 and 502/503/504 are retried with exponential backoff, honouring ``Retry-After``
  (seconds or an HTTP date) up to a cap; connection failures are retried too. Only 429
  is retried for POST, since a 5xx may mean the write happened (a batch of reads is
  retried like a GET).
- A 401 drops the cached token and retries once with a fresh one.
- An incremental patient fetch is one ``batch`` Bundle (the Patient read and a cheap probe
  per type, ``fhir_adapter.changes``), then a second with the ``_lastUpdated`` searches of
  the types that changed, if any; a server that refuses batch (4xx other than 401/408/429,
  or 501) or answers it with something that is not a batch-response is asked with separate
  requests from then on, by this client.
- Every failure surfaces as one of the typed errors in ``fhir_adapter.errors``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import httpx

from fhir_adapter.auth import Auth, NoAuth
from fhir_adapter.changes import Probe, probe_query, read_probe
from fhir_adapter.errors import (
    FhirError,
    FhirNotFound,
    FhirTimeout,
    FhirUnauthorized,
    FhirUnavailable,
    FhirUpstreamError,
)
from fhir_adapter.record import CLINICAL_TYPES, MEDICATION_TYPES, JsonObject, PatientRecord

FHIR_JSON = "application/fhir+json"
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_NO_CACHE = {"Cache-Control": "no-cache"}  # servers that cache searches (HAPI) revalidate

log = logging.getLogger(__name__)

# Told of every HTTP exchange: (method, resource type, seconds, outcome), where outcome is
# "ok" or the failure kind (timeout, connection, status_4xx, status_5xx). The service hangs
# its metrics here; the adapter itself stays free of any metrics library.
RequestObserver = Callable[[str, str, float, str], None]


@dataclass(frozen=True)
class FhirClientConfig:
    """How to talk to one FHIR server. Times are seconds."""

    base_url: str
    timeout: float = 30.0
    connect_timeout: float = 5.0
    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    page_size: int = 200
    max_pages: int = 10_000
    user_agent: str = "ehrmamba-fhir"
    auth: Auth = field(default_factory=NoAuth)
    observer: RequestObserver | None = None


@dataclass(frozen=True, slots=True)
class SearchEntry:
    """One search result; ``mode`` is ``match`` or ``include`` (from ``_include``)."""

    resource: JsonObject
    mode: str


class FhirClient:
    """Use as ``async with FhirClient(config) as fhir: ...``.

    ``transport`` replaces the network layer (tests inject faults a real server cannot
    be made to show).
    """

    def __init__(
        self, config: FhirClientConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._base_origin = origin(self.base_url)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            headers={"Accept": FHIR_JSON, "User-Agent": config.user_agent},
            transport=transport,
            follow_redirects=False,
        )
        # Whether the server takes a batch Bundle of reads: unknown until asked, False once
        # it refused one (then every fetch is made of separate requests).
        self.batch_supported: bool | None = None
        # Whether change probes can be believed (``fhir_adapter.changes``): unknown until
        # asked, False once an answer did not show the sort asked for.
        self.sort_supported: bool | None = None

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- reads -----------------------------------------------------------------------------

    async def read(self, resource_type: str, resource_id: str) -> JsonObject:
        """One resource by id; FhirNotFound for 404/410."""
        response = await self.request("GET", f"{resource_type}/{resource_id}")
        return _resource(response)

    async def search(
        self,
        resource_type: str,
        params: Mapping[str, str] | None = None,
        *,
        fresh: bool = False,
    ) -> AsyncIterator[SearchEntry]:
        """Every entry of a search, page after page. ``fresh`` asks caches to revalidate."""
        query = dict(params or {})
        query.setdefault("_count", str(self.config.page_size))
        async for entry in self._pages(f"{self.base_url}/{resource_type}", query, fresh):
            yield entry

    async def continue_search(self, url: str) -> AsyncIterator[SearchEntry]:
        """Every entry from a search page URL on (a ``next`` link someone else followed
        so far), on this server's origin only."""
        if origin(url) != self._base_origin:
            raise FhirUpstreamError("the search page is not on this FHIR server", url=url)
        async for entry in self._pages(url, None, fresh=True):
            yield entry

    async def _pages(
        self,
        url: str | None,
        query: Mapping[str, str] | None,
        fresh: bool,
        seen: set[str] | None = None,
    ) -> AsyncIterator[SearchEntry]:
        headers = _NO_CACHE if fresh else None
        seen = set() if seen is None else seen
        first = True
        while url is not None:
            if len(seen) >= self.config.max_pages:
                raise FhirUpstreamError("search returned too many pages", url=url)
            try:
                response = await self.request(
                    "GET", url, params=query if first else None, headers=headers
                )
            except FhirNotFound as exc:
                raise _search_gone(exc) from exc
            seen.add(str(response.url))
            first = False
            bundle = _search_bundle(_resource(response), str(response.url))
            for entry in search_entries(bundle):
                yield entry
            url = self._next_link(bundle, str(response.url), seen)

    async def fetch_patient(
        self, patient_id: str, *, since: datetime | None = None
    ) -> PatientRecord:
        """A patient's Patient resource and clinical resources, for ``build_timeline``.

        With ``since`` only resources updated after that instant are fetched (the Patient is
        always read), which is how the service extends a cached timeline: then in one
        ``batch`` request where the server takes one (``batch_supported``), else, as for a
        whole record, a read and one search per type (its pages in turn), side by side.
        """
        if since is not None and self.batch_supported is not False:
            batched = await self._fetch_batch(patient_id, since)
            if batched is not None:
                return batched
        patient = await self.read("Patient", patient_id)
        queries = [(t, _patient_query(t, patient_id, since)) for t in CLINICAL_TYPES]
        results = await asyncio.gather(
            *(_collect(self.search(t, query, fresh=True)) for t, query in queries)
        )
        return self._patient_record(patient_id, patient, results)

    def _patient_record(
        self, patient_id: str, patient: JsonObject, results: Sequence[Sequence[SearchEntry]]
    ) -> PatientRecord:
        resources: list[JsonObject] = []
        medications: dict[str, JsonObject] = {}
        for entries in results:
            for entry in entries:
                resource = entry.resource
                if resource.get("resourceType") == "Medication":
                    medications[f"Medication/{resource.get('id')}"] = resource
                elif entry.mode == "match":
                    resources.append(resource)
        return PatientRecord(
            patient_id=patient_id,
            patient=patient,
            resources=resources,
            source=self.base_url,
            medications=medications,
        )

    async def _fetch_batch(self, patient_id: str, since: datetime) -> PatientRecord | None:
        """``fetch_patient`` in batch Bundles: first the Patient read and a probe per type
        (``fhir_adapter.changes``), then, only for the types the probes did not clear, the
        ``_lastUpdated`` searches, each one's later pages followed as usual. Without sorting
        (``sort_supported`` False) the read and every search go in one batch. None (and
        separate requests from now on) when the server does not do batch."""
        read = f"Patient/{quote(patient_id, safe='')}"
        probing = self.sort_supported is not False
        first = (
            [f"{t}?{urlencode(probe_query(patient_id))}" for t in CLINICAL_TYPES]
            if probing
            else self._since_urls(CLINICAL_TYPES, patient_id, since)
        )
        answered = await self._batch([read, *first])
        if answered is None:
            return None
        patient = await self._batch_read(*answered[0])
        searches = answered[1:]
        if probing:
            pages = await asyncio.gather(*(self._batch_page(*a) for a in searches))
            verdicts = [read_probe(page, since) for page in pages]
            if Probe.NOT_SORTED in verdicts:
                self._no_sort()
            changed = [t for t, v in zip(CLINICAL_TYPES, verdicts, strict=True)
                       if v is not Probe.UNCHANGED]  # fmt: skip
            if not changed:
                return self._patient_record(patient_id, patient, [])
            filtered = await self._batch(self._since_urls(changed, patient_id, since))
            if filtered is None:
                return None
            searches = filtered
        results = await asyncio.gather(*(self._batch_search(*a) for a in searches))
        return self._patient_record(patient_id, patient, results)

    def _since_urls(self, types: Sequence[str], patient_id: str, since: datetime) -> list[str]:
        return [f"{t}?{urlencode(_patient_query(t, patient_id, since, self.config.page_size))}"
                for t in types]  # fmt: skip

    async def _batch(self, urls: Sequence[str]) -> list[tuple[JsonObject, int, str]] | None:
        """GET ``urls`` (relative: reads, or searches with a query) in one batch Bundle:
        each entry with its status and url. None (and separate requests from now on) when
        the server does not do batch. An entry that failed fails as the same request sent
        alone would: 404 for a read is ``FhirNotFound``, for a search the search is gone
        (checked for every entry before any later page is asked for); an entry the server
        would have us retry (429, 502-504) is left to the caller to send again alone."""
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "GET", "url": url}} for url in urls],
        }
        try:
            response = await self.request(
                "POST", self.base_url, json=bundle, headers=_NO_CACHE, idempotent=True
            )
        except FhirError as exc:
            if exc.status is None or not _refuses_batch(exc.status):
                raise
            self._no_batch(f"HTTP {exc.status}")
            return None
        try:
            answer = _json_body(response)
        except FhirUpstreamError:  # a proxy's page, say: not a batch-response either
            answer = None
        entries = answer.get("entry") if isinstance(answer, dict) else None
        if (
            not isinstance(answer, dict)
            or answer.get("resourceType") != "Bundle"
            or answer.get("type") != "batch-response"
            or not isinstance(entries, list)
            or len(entries) != len(urls)
            or not all(isinstance(e, dict) for e in entries)
        ):
            self._no_batch("an answer that is not a batch-response for every entry")
            return None
        self.batch_supported = True
        answered = [
            (entry, _entry_status(entry, f"{self.base_url}/{url}"), url)
            for entry, url in zip(entries, urls, strict=True)
        ]
        for entry, status, url in answered:  # before any paging
            if not 200 <= status < 300 and status not in _RETRY_STATUSES:
                error = _entry_error(entry, status, f"{self.base_url}/{url}")
                raise (
                    _search_gone(error) if "?" in url and isinstance(error, FhirNotFound) else error
                )
        return answered

    def _no_sort(self) -> None:
        if self.sort_supported is not False:
            log.warning(
                "the FHIR server %s did not show that it sorts by _lastUpdated: checking "
                "for changes with _lastUpdated searches",
                self.base_url,
            )
        self.sort_supported = False

    def _no_batch(self, why: str) -> None:
        if self.batch_supported is not False:
            log.warning("the FHIR server %s does not take batch requests (%s): fetching "
                        "with separate requests", self.base_url, why)  # fmt: skip
        self.batch_supported = False

    async def _batch_read(self, entry: JsonObject, status: int, url: str) -> JsonObject:
        """The resource of a successful batch entry that read ``url`` (read alone again,
        with the usual retries, when the server said to retry)."""
        if status in _RETRY_STATUSES:
            return _resource(await self.request("GET", url))
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise FhirUpstreamError("server sent JSON that is not a FHIR resource",
                                    url=f"{self.base_url}/{url}", status=status)  # fmt: skip
        return resource

    async def _batch_page(self, entry: JsonObject, status: int, url: str) -> JsonObject:
        """The searchset page of a successful batch entry that searched ``url`` (searched
        alone again, with the usual retries, when the server said to retry)."""
        target = f"{self.base_url}/{url}"
        if status in _RETRY_STATUSES:
            try:
                response = await self.request("GET", target, headers=_NO_CACHE)
            except FhirNotFound as exc:
                raise _search_gone(exc) from exc
            return _search_bundle(_resource(response), str(response.url))
        return _search_bundle(entry.get("resource"), target)

    async def _batch_search(self, entry: JsonObject, status: int, url: str) -> list[SearchEntry]:
        """Every result of a successful batch entry that searched ``url``: its page, then
        the pages its ``next`` links lead to."""
        target = f"{self.base_url}/{url}"
        bundle = await self._batch_page(entry, status, url)
        found = list(search_entries(bundle))
        seen = {target}
        following = self._next_link(bundle, target, seen)
        if following is not None:
            found += [e async for e in self._pages(following, None, fresh=True, seen=seen)]
        return found

    # --- writes ----------------------------------------------------------------------------

    async def transaction(self, bundle: JsonObject) -> JsonObject:
        """POST a transaction or batch Bundle to the base URL; returns the response Bundle."""
        response = await self.request("POST", self.base_url, json=bundle)
        return _resource(response)

    async def download(
        self,
        url: str,
        target: Path,
        *,
        authorised: bool,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Stream ``url`` to ``target`` without holding it in memory; returns bytes written.

        Credentials are sent only when ``authorised`` (a Bulk manifest's
        ``requiresAccessToken``), so a token never reaches a storage host that did not ask.
        """
        send = dict(headers or {})
        if authorised:
            send.update(await self.config.auth.headers(self._http))
        written = 0
        try:
            async with self._http.stream("GET", url, headers=send) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error_for(response)
                with target.open("wb") as sink:
                    async for chunk in response.aiter_bytes():
                        sink.write(chunk)
                        written += len(chunk)
        except httpx.TimeoutException as exc:
            raise FhirTimeout(f"download timed out: {exc!r}", url=url) from exc
        except httpx.TransportError as exc:
            raise FhirUnavailable(f"download failed: {exc!r}", url=url) from exc
        return written

    # --- the one place requests are sent ---------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        json: JsonObject | None = None,
        expect: frozenset[int] = frozenset({200, 201}),
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send with auth, retries and error mapping; returns a response whose status is in
        ``expect``. Relative ``url`` values are taken against the base URL. 502-504 are
        retried only for an ``idempotent`` request (default: GET), such as a batch of
        reads."""
        target = url if "://" in url else f"{self.base_url}/{url.lstrip('/')}"
        send_headers = dict(headers or {})
        if json is not None:
            send_headers["Content-Type"] = FHIR_JSON
        if idempotent is None:
            idempotent = method == "GET"
        reauthorised = False
        attempt = 0
        while True:
            auth_headers = await self.config.auth.headers(self._http)
            sent = time.perf_counter()
            try:
                # httpx times each read; a server sending a byte at a time never trips that,
                # so the whole exchange gets the timeout too.
                async with asyncio.timeout(self.config.timeout):
                    response = await self._http.request(
                        method,
                        target,
                        params=params,
                        json=json,
                        headers={**send_headers, **auth_headers},
                    )
            except (httpx.TimeoutException, TimeoutError) as exc:
                self._observe(method, target, sent, "timeout")
                if isinstance(exc, httpx.ConnectTimeout) and attempt < self.config.max_retries:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt, None))
                    continue
                raise FhirTimeout(f"no answer within the timeout: {exc!r}", url=target) from exc
            except httpx.TransportError as exc:
                self._observe(method, target, sent, "connection")
                if attempt < self.config.max_retries:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt, None))
                    continue
                raise FhirUnavailable(f"server unreachable: {exc!r}", url=target) from exc
            status = response.status_code
            self._observe(method, target, sent, "ok" if status in expect else _status_kind(status))
            if status in expect:
                return response
            if status == 401 and not reauthorised:
                reauthorised = True
                self.config.auth.invalidate()
                continue
            retryable = status == 429 or (status in _RETRY_STATUSES and idempotent)
            if retryable and attempt < self.config.max_retries:
                attempt += 1
                await asyncio.sleep(self._backoff(attempt, response.headers.get("Retry-After")))
                continue
            raise _error_for(response)

    def _observe(self, method: str, target: str, sent: float, outcome: str) -> None:
        if self.config.observer is not None:
            resource_type = _resource_type(target, self.base_url)
            self.config.observer(method, resource_type, time.perf_counter() - sent, outcome)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait: the server's ``Retry-After`` if given, else jittered doubling."""
        wait = _parse_retry_after(retry_after)
        if wait is None:
            wait = self.config.backoff_base * 2 ** (attempt - 1) * (0.5 + random.random())
        return min(max(wait, 0.0), self.config.backoff_max)

    def _next_link(self, bundle: JsonObject, current: str, seen: set[str]) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next":
                url = urljoin(current, str(link.get("url", "")))
                if origin(url) != self._base_origin:
                    raise FhirUpstreamError("next link points outside the FHIR server", url=url)
                if url in seen:
                    raise FhirUpstreamError("search paging loops back on itself", url=url)
                return url
        return None


def origin(url: str) -> tuple[str, str]:
    """(scheme, host:port) of a URL, lower-cased: what counts as 'the same server'."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _status_kind(status: int) -> str:
    return "status_5xx" if status >= 500 else "status_4xx"


def _resource_type(target: str, base_url: str) -> str:
    """The resource type a URL addresses (``Observation`` for ``base/Observation?...``);
    ``other`` for the base itself or a server's opaque paging URL. Never an id."""
    path = urlsplit(target).path
    base_path = urlsplit(base_url).path.rstrip("/")
    rest = path[len(base_path) :] if path.startswith(base_path) else ""
    first = rest.strip("/").split("/", 1)[0]
    return first if first[:1].isupper() and first.isalpha() else "other"


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - time.time()


def search_entries(bundle: JsonObject) -> Iterator[SearchEntry]:
    """The resources of one searchset page, with their search mode (``match`` when the
    server gives none)."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            mode = (entry.get("search") or {}).get("mode", "match")
            yield SearchEntry(resource, str(mode))


async def _collect(found: AsyncIterator[SearchEntry]) -> list[SearchEntry]:
    return [entry async for entry in found]


def _patient_query(
    resource_type: str, patient_id: str, since: datetime | None, count: int | None = None
) -> dict[str, str]:
    """The search for one type of a patient's resources (updated after ``since``)."""
    params = {"patient": patient_id}
    if since is not None:
        params["_lastUpdated"] = "gt" + since.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if resource_type in MEDICATION_TYPES:
        params["_include"] = f"{resource_type}:medication"
    if count is not None:
        params["_count"] = str(count)
    return params


def _search_bundle(body: object, url: str) -> JsonObject:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FhirUpstreamError("search did not return a Bundle", url=url)
    return body


def _search_gone(exc: FhirError) -> FhirUpstreamError:
    # A search that matches nothing answers an empty Bundle, so a 404 or 410 there is the
    # server losing the search (an expired page), never a missing patient.
    # The message carries the status; the error does not, so that it reads as what it is.
    return FhirUpstreamError(f"search or search page gone (HTTP {exc.status})", url=exc.url)


def _refuses_batch(status: int) -> bool:
    """Whether a batch POST answered with ``status`` says "no batch here" (400, 404, 405,
    415, 501, ...), rather than failing for reasons separate requests would meet as well
    (credentials, throttling, an outage)."""
    return (400 <= status < 500 and status not in (401, 408, 429)) or status == 501


def _entry_status(entry: JsonObject, url: str) -> int:
    """The HTTP status of a batch-response entry (``"404 Not Found"`` is 404)."""
    status = str((entry.get("response") or {}).get("status") or "").strip()
    code = status.split(" ", 1)[0]
    if len(code) != 3 or not code.isdigit():
        raise FhirUpstreamError("batch entry without an HTTP status", url=url)
    return int(code)


def _entry_error(entry: JsonObject, status: int, url: str) -> FhirError:
    """What a failed batch entry would have raised as a request of its own."""
    outcome = (entry.get("response") or {}).get("outcome") or entry.get("resource")
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        outcome = None
    return _status_error(status, outcome, url, None)


def _json_body(response: httpx.Response) -> object:
    try:
        return response.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to read
        raise FhirUpstreamError(
            "server sent a body that is not JSON",
            url=str(response.url),
            status=response.status_code,
        ) from exc


def _resource(response: httpx.Response) -> JsonObject:
    body = _json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FhirUpstreamError(
            "server sent JSON that is not a FHIR resource",
            url=str(response.url),
            status=response.status_code,
        )
    return body


def _error_for(response: httpx.Response) -> FhirError:
    outcome: dict[str, Any] | None = None
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            outcome = body
    except (ValueError, RecursionError):  # no usable OperationOutcome: the status speaks
        pass
    return _status_error(response.status_code, outcome, str(response.url), response.reason_phrase)


def _status_error(
    status: int, outcome: dict[str, Any] | None, url: str, reason: str | None
) -> FhirError:
    """The typed error for a failed request (or batch entry) with ``status``."""
    detail = _diagnostics(outcome) or reason or f"HTTP {status}"
    kwargs: dict[str, Any] = {"url": url, "status": status, "outcome": outcome}
    if status in (404, 410):
        return FhirNotFound(f"not found: {detail}", **kwargs)
    if status in (401, 403):
        return FhirUnauthorized(f"not authorised: {detail}", **kwargs)
    return FhirUpstreamError(f"FHIR server error: {detail}", **kwargs)


def _diagnostics(outcome: dict[str, Any] | None) -> str | None:
    if not outcome:
        return None
    texts = [
        str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
        for issue in outcome.get("issue") or []
        if isinstance(issue, dict)
    ]
    return "; ".join(t for t in texts if t) or None
