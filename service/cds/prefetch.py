"""A CDS hook call's patient record: from its prefetch, completed from its ``fhirServer``.

Rules (CDS Hooks 2.0, "Providing FHIR Resources to a CDS Service"):
- A key the client left out, or answered with an OperationOutcome (alone, or as an error
  entry of the Bundle), is read from ``fhirServer`` with the same query the template names.
- ``null`` means the client has no data for that key: an empty search, never a fetch. A
  ``null`` Patient leaves nothing to score, which is 412.
- A paged prefetch Bundle is completed by following its ``next`` links on ``fhirServer``
  only.
- Without ``fhirServer`` any of that is ``PrefetchIncomplete`` (the route answers 412).
- Data that contradicts the call (a Patient other than ``context.patientId``, a resource of
  another patient, a key that is not the resource it names) is ``PrefetchInvalid`` (422):
  scoring a mix of two patients is worse than not scoring.
- OperationOutcome entries of lesser severity and resources of types a key did not ask
  for are skipped and counted in ``PrefetchFacts.skipped``.

Prefetched resources reach ``build_timeline`` the way ``FhirClient.fetch_patient`` hands
over fetched ones: references as written (the normaliser reads relative, absolute and
versioned ones alike), searchset ``fullUrl`` references rewritten by the same
``bundle_resources`` the file readers use, and Medications keyed ``Medication/<id>``.

The ``fhirAuthorization`` token is unwrapped in one place, ``fhir_access``, into the
client's ``BearerToken``; no message here ever holds it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import SplitResult, urljoin, urlsplit

from fhir_adapter.auth import Auth, BearerToken, NoAuth
from fhir_adapter.client import FhirClient
from fhir_adapter.files import bundle_resources
from fhir_adapter.record import JsonObject, PatientRecord
from fhir_adapter.references import patient_id_of
from service.cds.models import HookRequest
from service.cds.services import PREFETCH, PrefetchQuery

PREFETCH_SOURCE = "cds-hooks-prefetch"  # the record's source when the call names no server
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FAILED_SEVERITIES = frozenset({"error", "fatal"})


class CdsDataError(Exception):
    """A call whose data cannot be used. ``status`` and ``code`` are the HTTP status and
    OperationOutcome issue code to answer with; the message is safe to show the client."""

    status: ClassVar[int]
    code: ClassVar[str]


class FhirServerRefused(CdsDataError):
    """``fhirServer`` is not one of the allow-listed base URLs (no request is made to it)."""

    status = 403
    code = "forbidden"


class PrefetchIncomplete(CdsDataError):
    """Data is missing and there is no ``fhirServer`` to read it from."""

    status = 412
    code = "incomplete"


class PrefetchInvalid(CdsDataError):
    """The prefetch contradicts the call or is not what its template asks for."""

    status = 422
    code = "invalid"


@dataclass(frozen=True)
class PrefetchFacts:
    """Where the record came from: resources per type taken from the prefetch and read from
    ``fhirServer``, the keys that needed the server, and entries left out (``key:Type``)."""

    prefetched: dict[str, int]
    fetched: dict[str, int]
    fetched_keys: tuple[str, ...]
    skipped: dict[str, int]


def check_fhir_server(url: str, allowed: Sequence[str]) -> str:
    """The allow-listed base URL that ``url`` names, without trailing slashes.

    Scheme, host, port (defaults filled in) and path must equal an entry's exactly, after
    trailing slashes are dropped; user info, queries, fragments, other schemes than
    http(s) and control characters are refused outright. The configured entry is returned,
    not ``url``, so a connection only ever goes to a string an operator wrote. Pure: no
    DNS, no connection.
    """
    wanted = _server_key(url)
    if wanted is not None:
        for entry in allowed:
            if _server_key(entry) == wanted:
                return entry.rstrip("/")
    raise FhirServerRefused(
        "fhirServer is not on this service's allow-list (EHRMAMBA_FHIR_SERVER_ALLOW)"
    )


def fhir_access(request: HookRequest, allowed: Sequence[str]) -> tuple[str, Auth] | None:
    """The checked ``fhirServer`` base URL and the credential for it (the call's bearer
    token, or none); None when the call names no server. Check it before using the
    prefetch, so a call cannot label data with a server it may not name."""
    if request.fhir_server is None:
        return None
    base = check_fhir_server(str(request.fhir_server), allowed)
    token = request.fhir_authorization
    auth: Auth = BearerToken(token.access_token.get_secret_value()) if token else NoAuth()
    return base, auth


async def gather_record(
    request: HookRequest, patient_id: str, fetch: Callable[[], FhirClient | None]
) -> tuple[PatientRecord, PrefetchFacts]:
    """The patient's record from the call's prefetch, completed through ``fetch()`` (a
    client for ``fhirServer``, or None without one; called at most once, only when needed).

    Raises PrefetchIncomplete, PrefetchInvalid, and the ``FhirError`` of a failed read.
    """
    gathered = _Gathered(patient_id)
    prefetch = request.prefetch or {}
    to_fetch: list[tuple[PrefetchQuery, JsonObject | None]] = []  # (query, page to continue)
    patient: JsonObject | None = None
    for query in PREFETCH:
        value = prefetch.get(query.key)
        if query.key not in prefetch or _failed(value):
            to_fetch.append((query, None))
        elif value is None and query.is_read:
            raise PrefetchIncomplete("the CDS client has no Patient for context.patientId")
        elif value is None:
            continue
        elif query.is_read:
            patient = gathered.take_patient(value, gathered.prefetched)
        else:
            bundle = _bundle(query, value)
            gathered.take(query, _bundle_resources(query, bundle), gathered.prefetched)
            if _next_link(bundle, "") is not None:
                to_fetch.append((query, bundle))
    if to_fetch:
        fhir = fetch()
        if fhir is None:
            keys = ", ".join(repr(q.key) for q, _ in to_fetch)
            raise PrefetchIncomplete(
                f"the prefetch lacks {keys} (left out, failed in the CDS client, or paged) "
                "and the call names no fhirServer to read them from"
            )
        async with fhir:
            read = await asyncio.gather(*(gathered.fetch(fhir, q, page) for q, page in to_fetch))
        patient = next((p for p in read if p is not None), patient)
    record = PatientRecord(
        patient_id=patient_id,
        patient=patient,
        resources=[r for q in PREFETCH for r in gathered.by_key.get(q.key, [])],
        source=str(request.fhir_server).rstrip("/") if request.fhir_server else PREFETCH_SOURCE,
        medications=gathered.medications,
    )
    facts = PrefetchFacts(
        prefetched=dict(gathered.prefetched),
        fetched=dict(gathered.fetched),
        fetched_keys=tuple(q.key for q, _ in to_fetch),
        skipped=dict(gathered.skipped),
    )
    return record, facts


@dataclass
class _Gathered:
    patient_id: str
    by_key: dict[str, list[JsonObject]] = field(default_factory=dict)
    medications: dict[str, JsonObject] = field(default_factory=dict)
    prefetched: Counter[str] = field(default_factory=Counter)
    fetched: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def take_patient(self, resource: JsonObject, counts: Counter[str]) -> JsonObject:
        if resource.get("resourceType") != "Patient":
            raise PrefetchInvalid("prefetch 'patient' is not a Patient resource")
        if resource.get("id") != self.patient_id:
            raise PrefetchInvalid("the prefetched Patient is not context.patientId")
        counts["Patient"] += 1
        return resource

    def take(
        self, query: PrefetchQuery, resources: Iterable[JsonObject], counts: Counter[str]
    ) -> None:
        """Keep a key's resources of its own type (and the Medications it includes)."""
        kept = self.by_key.setdefault(query.key, [])
        for resource in resources:
            rtype = str(resource.get("resourceType"))
            if rtype == query.resource_type:
                if patient_id_of(resource) != self.patient_id:
                    raise PrefetchInvalid(f"{query.key!r} holds a {rtype} of another patient")
                kept.append(resource)
            elif rtype == "Medication" and query.include:
                self.medications[f"Medication/{resource.get('id')}"] = resource
            else:
                self.skipped[f"{query.key}:{rtype}"] += 1
                continue
            counts[rtype] += 1

    async def fetch(
        self, fhir: FhirClient, query: PrefetchQuery, page: JsonObject | None
    ) -> JsonObject | None:
        """Read a key from the server (returning the Patient for the read), or the rest of
        a paged prefetch Bundle."""
        if query.is_read:
            return self.take_patient(await fhir.read("Patient", self.patient_id), self.fetched)
        if page is None:
            params = query.search_params(self.patient_id)
            search = fhir.search(query.resource_type, params, fresh=True)
            self.take(query, [entry.resource async for entry in search], self.fetched)
        else:
            await self._follow(fhir, query, page)
        return None

    async def _follow(self, fhir: FhirClient, query: PrefetchQuery, page: JsonObject) -> None:
        """The rest of a paged prefetch, from its next link on ``fhirServer`` only (a link
        the client sent elsewhere is its error, 422; the server's own paging is checked by
        the FHIR client)."""
        link = _next_link(page, fhir.base_url + "/")
        if link is None:
            return
        if not _is_under(link, fhir.base_url):
            raise PrefetchInvalid(f"the next link of prefetch {query.key!r} is not on fhirServer")
        rest = [entry.resource async for entry in fhir.continue_search(link)]
        self.take(query, rest, self.fetched)


def _server_key(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of a base URL, or None when it is not a plain one."""
    parsed = _parse(url)
    if parsed is None or parsed[1].query or parsed[1].fragment or url.endswith(("?", "#")):
        return None
    origin, parts = parsed
    return (*origin, parts.path.rstrip("/"))


def _is_under(url: str, base: str) -> bool:
    """Whether ``url`` is on the server at ``base``: same origin, path at or below it."""
    parsed, root = _parse(url), _server_key(base)
    if parsed is None or root is None:
        return False
    origin, parts = parsed
    path = parts.path.rstrip("/")
    return origin == root[:3] and (path == root[3] or path.startswith(root[3] + "/"))


def _parse(url: str) -> tuple[tuple[str, str, int], SplitResult] | None:
    """(scheme, host, port) and the parts of an http(s) URL; None for anything else,
    including user info and characters that parsers disagree about."""
    if any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    return (scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]), parts


def _failed(value: JsonObject | None) -> bool:
    """Whether the client reports an error for this key: an OperationOutcome in place of
    the result, or an error entry inside its Bundle (the rest may be partial)."""
    if value is None:
        return False
    if value.get("resourceType") == "OperationOutcome":
        return True
    entries = value.get("entry") if value.get("resourceType") == "Bundle" else None
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            issues = resource.get("issue")
            if any(
                isinstance(i, dict) and i.get("severity") in _FAILED_SEVERITIES
                for i in (issues if isinstance(issues, list) else [])
            ):
                return True
    return False


def _bundle(query: PrefetchQuery, value: JsonObject) -> JsonObject:
    if value.get("resourceType") != "Bundle":
        raise PrefetchInvalid(f"prefetch {query.key!r} is not a searchset Bundle")
    return value


def _bundle_resources(query: PrefetchQuery, bundle: JsonObject) -> list[JsonObject]:
    """The Bundle's resources; one nested too deep for reference rewriting (it recurses as
    deep as the JSON goes) is the client's error, not a crash."""
    try:
        return bundle_resources(bundle)
    except RecursionError:
        raise PrefetchInvalid(f"prefetch {query.key!r} is nested too deeply") from None


def _next_link(bundle: JsonObject, against: str) -> str | None:
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return urljoin(against, str(link["url"]))
    return None
