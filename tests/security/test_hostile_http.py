"""Hostile HTTP against the service as deployed: uvicorn on a loopback port, raw bytes on a
socket, so nothing a client library would tidy up (encoded slashes, CR/LF, lying lengths)
is tidied. Every answer must be a 4xx in bounded time, never a 5xx, a crash or a hang;
answers the app writes are OperationOutcome; no hostile id reaches the FHIR server; the
API key is never echoed; and the server still answers afterwards.

The last part turns the tables: a FHIR server answering hostile JSON to the REST route.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr

from service.app import create_app
from service.settings import Settings
from tests.security.loopback import Loopback, loopback
from tests.service.conftest import MODEL, ApiFactory

LIMIT = 1024 * 1024  # EHRMAMBA_MAX_BODY_BYTES here; 100k levels of [] fit under it
API_KEY = "api-key-e5b0c3a9d1"
BOUND_S = 20.0  # per exchange
HOOK = "/cds-services/ehrmamba-patient-view"
FEEDBACK = HOOK + "/feedback"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Served:
    port: int
    fhir: Loopback


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app under uvicorn, reading a FHIR server that knows no patient."""
    store = tmp_path_factory.mktemp("hostile") / "store.db"
    with loopback() as fhir:
        app = create_app(
            Settings(
                model_path=MODEL,
                database_url=f"sqlite:///{store}",
                fhir_base_url=fhir.origin + "/fhir",
                fhir_retries=0,
                api_keys=[SecretStr(API_KEY)],
                cds_require_jwt=False,  # so hostile bodies get past the JWT to the parsers
                max_body_bytes=LIMIT,
            )
        )
        listening = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]})
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield Served(listening.getsockname()[1], fhir)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            listening.close()


def exchange(port: int, head: bytes, chunks: Iterable[bytes] = ()) -> Reply:
    """Send a raw request, stopping early if the server answers first, and read one reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as sock:
        try:
            sock.sendall(head)
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break  # answered (a 413) before the body ended
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed; the reply is still there to read
        return _read_reply(sock)


def _read_reply(sock: socket.socket) -> Reply:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a reply: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(int(status_line.split()[1]), headers, body)


def request(method: str, target: bytes, *headers: bytes, body: bytes | None = None) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: service", *headers]
    lines.append(b"Connection: close")
    if body is not None:
        lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def _refused(reply: Reply, *statuses: int) -> None:
    """A client error (one of ``statuses`` when given); the app's own are OperationOutcome
    (uvicorn answers malformed HTTP itself, in plain text, before the app sees it)."""
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    if statuses:
        assert reply.status in statuses, (reply.status, reply.body[:300])
    if "json" in reply.headers.get("content-type", ""):
        assert json.loads(reply.body)["resourceType"] == "OperationOutcome"
    assert API_KEY.encode() not in reply.body
    assert not any("injected" in k for k in reply.headers)


def _still_answers(served: Served) -> None:
    reply = exchange(served.port, request("GET", b"/health/live"))
    assert reply.status == 200


# --- oversized bodies --------------------------------------------------------------------

KEY = b"X-API-Key: " + API_KEY.encode()
CHUNK = 64 * 1024


def _chunked(total: int, *, end: bool) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n"
        sent += CHUNK
    if end:
        yield b"0\r\n\r\n"


def _head(target: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: service", KEY, b"Connection: close"]
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n"


@pytest.mark.parametrize("target", [HOOK.encode(), FEEDBACK.encode(), b"/patients/p1/predict"])
def test_a_declared_length_over_the_limit_is_413_before_any_body(
    served: Served, target: bytes
) -> None:
    """10 GB declared and none sent: answered at once, not after waiting for the body."""
    started = time.monotonic()
    reply = exchange(served.port, _head(target, b"Content-Length: 10737418240"))
    _refused(reply, 413)
    assert time.monotonic() - started < 10
    _refused(
        exchange(
            served.port, _head(target, b"Content-Length: %d" % (LIMIT + 1)), [b"x" * (LIMIT + 1)]
        ),
        413,
    )
    _still_answers(served)


@pytest.mark.parametrize("end", [True, False], ids=["ended", "endless"])
@pytest.mark.parametrize("target", [HOOK.encode(), FEEDBACK.encode()])
def test_a_chunked_body_over_the_limit_is_413(served: Served, target: bytes, end: bool) -> None:
    """Without a length the body is counted as read: 413 once it passes the limit, whether
    or not it would ever end."""
    head = _head(target, b"Content-Type: application/json", b"Transfer-Encoding: chunked")
    _refused(exchange(served.port, head, _chunked(2 * LIMIT, end=end)), 413)
    _still_answers(served)


@pytest.mark.parametrize(
    "length", [b"abc", b"-1", b"1e3", b"0x10", b"5, 6", b"99999999999999999999999999"]
)
def test_an_unreadable_content_length_is_refused(served: Served, length: bytes) -> None:
    _refused(exchange(served.port, _head(HOOK.encode(), b"Content-Length: " + length), [b"{}"]))
    _still_answers(served)


# --- deep nesting ------------------------------------------------------------------------


def _hook(prefetch: str) -> bytes:
    head = (
        '{"hook": "patient-view", "hookInstance": "0b8ad0c4-2d7d-4b8e-9d1e-2c8e0f0b6a11", '
        '"context": {"userId": "Practitioner/x", "patientId": "p1"}, "prefetch": '
    )
    return (head + prefetch + "}").encode()


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def _bundle_nested(depth: int) -> str:
    """A prefetch whose encounters Bundle holds a resource nested ``depth`` deep and a
    fullUrl (so its references are rewritten, walking the whole nest)."""
    entry = (
        '{"fullUrl": "urn:uuid:e1", "resource": {"resourceType": "Encounter", "id": "e1", '
        f'"subject": {{"reference": "Patient/p1"}}, "x": {_nest(depth)}}}}}'
    )
    bundle = f'{{"resourceType": "Bundle", "type": "searchset", "entry": [{entry}]}}'
    return f'{{"patient": {{"resourceType": "Patient", "id": "p1"}}, "encounters": {bundle}}}'


@pytest.mark.parametrize(
    ("target", "body"),
    [
        pytest.param(HOOK, _nest(100_000).encode(), id="hook-body-100k"),
        pytest.param(FEEDBACK, _nest(100_000).encode(), id="feedback-body-100k"),
        pytest.param(HOOK, _hook(f'{{"patient": {_nest(100_000)}}}'), id="prefetch-100k"),
        pytest.param(HOOK, _hook(_bundle_nested(600)), id="prefetch-bundle-600"),
        pytest.param(HOOK, _hook(_bundle_nested(900)), id="prefetch-bundle-900"),
        pytest.param(HOOK, _hook(_bundle_nested(5_000)), id="prefetch-bundle-5k"),
    ],
)
def test_deeply_nested_json_is_422_not_a_recursion_error(
    served: Served, target: str, body: bytes
) -> None:
    reply = exchange(served.port, request("POST", target.encode(), KEY, body=body))
    _refused(reply, 422)
    _still_answers(served)


# --- ids, headers, query values ----------------------------------------------------------

HOSTILE_TARGETS = [
    b"/patients/..%2F..%2Fetc%2Fpasswd/predict",
    b"/patients/..%252F..%252Fetc%252Fpasswd/predict",
    b"/patients/%2e%2e/predict",
    b"/patients/%2e/predict",
    b"/patients/../predict",
    b"/patients/.../predictions",
    b"/patients/..%5C..%5Cwindows/predict",
    b"/patients/p1%2F..%2F..%2Fmetadata/predict",
    b"/patients/p1%00/predict",
    b"/patients/p1%0d%0aX-Injected:%201/predict",
    b"/patients/%C3%A9l%C3%A8ve/predict",
    b"/patients/%EF%BC%8E%EF%BC%8E/predict",  # fullwidth dots
    b"/patients/p1%3F_format%3Dxml/predict",
    b"/patients/p1%23frag/predictions",
    b"/patients/" + b"a" * 10_000 + b"/predict",
    b"/patients/%ff%fe/predict",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS, ids=range(len(HOSTILE_TARGETS)))
def test_hostile_patient_ids_never_reach_the_fhir_server(served: Served, target: bytes) -> None:
    asked = len(served.fhir.paths)
    method = "GET" if target.endswith(b"predictions") else "POST"
    _refused(exchange(served.port, request(method, target, KEY, b"Content-Length: 0")))
    assert served.fhir.paths[asked:] == []
    _still_answers(served)


@pytest.mark.parametrize(
    "header",
    [
        KEY + b"\rX-Injected: 1",  # bare CR
        KEY + b"\nX-Injected: 1",  # bare LF
        KEY + b"\x00",
        b"X-API-Key: \x80\xff\xfe" + API_KEY.encode(),  # obs-text around the key
        b"Authorization: Bearer " + API_KEY.encode() + b"\r",
        b"X-Api-Key : " + API_KEY.encode(),  # space before the colon
        b"X-Long: " + b"x" * 100_000,
        b"\r\n".join(b"X-Many-%d: x" % n for n in range(2_000)),
    ],
    ids=["cr", "lf", "nul", "obs-text", "trailing-cr", "space-colon", "long", "many"],
)
def test_header_injection_is_refused(served: Served, header: bytes) -> None:
    """Refused by the HTTP parser or at the key check; a bare LF, which HTTP/1.1 lets a
    server take for a line end, makes two plain headers, and the call goes on as one for
    patient p1. Nothing injected reaches the FHIR server or comes back as a header."""
    asked = len(served.fhir.paths)
    _refused(exchange(served.port, request("POST", b"/patients/p1/predict", header)))
    assert set(served.fhir.paths[asked:]) <= {"/fhir/Patient/p1"}
    _still_answers(served)


@pytest.mark.parametrize(
    "query",
    [
        b"forecast=1e99",
        b"forecast=99999999999999999999999999999",
        b"forecast=-1",
        b"forecast=NaN",
        b"forecast=%00",
        b"forecast=5&forecast=1e99",
        b"tasks=" + b"," * 10_000,
        b"tasks=" + b"%2C" * 3_000,
        b"tasks=mortality%0d%0aX-Injected:%201",
        b"tasks=" + b"x" * 12_000,
        b"tasks=" + b"mortality," * 1_000 + b"&forecast=3",
        b"tasks[]=mortality&tasks[0]=x&=&&&",
    ],
    ids=range(12),
)
def test_absurd_query_values_are_client_errors(served: Served, query: bytes) -> None:
    reply = exchange(served.port, request("POST", b"/patients/p1/predict?" + query, KEY))
    _refused(reply)
    _still_answers(served)


@pytest.mark.parametrize("limit", [b"0", b"-5", b"1e99", b"10" * 40, b"NaN", b"%00"])
def test_absurd_history_limits_are_422(served: Served, limit: bytes) -> None:
    _refused(
        exchange(served.port, request("GET", b"/patients/p1/predictions?limit=" + limit, KEY)), 422
    )


# --- hostile answers from the FHIR server ------------------------------------------------

STAY = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"code": "IMP"},
    "subject": {"reference": "Patient/p1"},
    "period": {"start": "2020-03-01T00:00:00Z", "end": "2020-03-04T00:00:00Z"},
}
LAB = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "subject": {"reference": "Patient/p1"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "effectiveDateTime": "2020-03-02T00:00:00Z",
    "valueQuantity": {"value": "@NaN@", "unit": "mg/dL"},
}


def _fhir(patient: str, extra: str = "[]") -> Any:
    """A FHIR server answering ``patient`` (raw JSON text) to the read and one stay, one
    lab (NaN valued) and ``extra`` (raw JSON) to the searches."""

    def respond(path: str) -> tuple[int, dict[str, str], bytes]:
        found = {"Encounter": [STAY], "Observation": [LAB]}
        if path.startswith("/fhir/Patient/"):
            body = patient
        else:
            kind = path.split("/")[2].split("?")[0]
            entries = [json.dumps({"resource": r}) for r in found.get(kind, [])]
            if kind == "Condition":
                entries.append(f'{{"resource": {{"resourceType": "Condition", "x": {extra}}}}}')
            listed = ",".join(entries)
            body = f'{{"resourceType": "Bundle", "type": "searchset", "entry": [{listed}]}}'
        body = body.replace('"@NaN@"', "NaN")  # what Python's json reads and writes
        return 200, {"Content-Type": "application/fhir+json"}, body.encode()

    return respond


PATIENT = '{"resourceType": "Patient", "id": "p1", "birthDate": "1950-01-01"%s}'


@pytest.mark.parametrize(
    ("patient", "extra", "status"),
    [
        pytest.param(PATIENT % "", "[]", 200, id="sound-with-a-NaN-lab"),
        pytest.param(PATIENT % ', "birthDate": null', "[]", 422, id="no-birth-date"),
        pytest.param(PATIENT % ', "birthDate": "1950-02-30"', "[]", 422, id="bad-birth-date"),
        pytest.param('{"resourceType": "Bundle", "entry": []}', "[]", 422, id="bundle-for-patient"),
        pytest.param(PATIENT % f', "x": {_nest(300)}', _nest(300), 200, id="nested-300"),
        pytest.param(PATIENT % f', "x": {_nest(100_000)}', "[]", 502, id="nested-100k"),
        pytest.param(PATIENT % "", _nest(100_000), 502, id="search-nested-100k"),
        pytest.param("[" * 50 + "NaN" + "]" * 50, "[]", 502, id="not-a-resource"),
    ],
)
async def test_hostile_fhir_answers_are_answered_not_crashed_on(
    make_api: ApiFactory, patient: str, extra: str, status: int
) -> None:
    """Nests deeper than the cache can write are served uncached; deeper than JSON can be
    read, a FHIR failure (502); a Patient that cannot be scored, 422. Twice each, so the
    second call meets whatever the first one cached."""
    with loopback(_fhir(patient, extra)) as fhir:
        async with make_api(fhir_base_url=fhir.origin + "/fhir", fhir_retries=0) as api:
            for _ in range(2):
                response = await api.post("/patients/p1/predict")
                assert response.status_code == status, response.text
                assert (status == 200) == ("predictions" in response.json())
