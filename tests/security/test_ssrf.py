"""Server-side request forgery through a CDS call's ``fhirServer`` and the FHIR answers
that come back: the service must connect to no host an operator did not allow-list, resolve
no name it is about to refuse, follow no redirect or paging link to another host, and never
show the call's bearer token or patient id in what it answers.

"Internal hosts" are loopback servers that count connections (tests.security.loopback).
Client JWTs are off here: these are the checks that stand even when a trusted EHR (or
someone holding its key) sends a hostile call; JWT checks have their own tests.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.cds.services import PREFETCH
from tests.security.loopback import Loopback, loopback
from tests.service.conftest import ApiFactory
from tests.support.cds import hook_body

PATH = "/cds-services/ehrmamba-patient-view"
ALLOWED = "https://fhir.allowed.example/r4"  # on the allow-list; never reachable here
TOKEN = "fhir-access-token-9f2c61d0"  # the call's fhirAuthorization
SERVICE_TOKEN = "service-fhir-token-51ab77e3"  # EHRMAMBA_FHIR_TOKEN
PATIENT = "ssrf-patient-4242"
SECRETS = (TOKEN, SERVICE_TOKEN, PATIENT)


@pytest.fixture
def internal() -> Iterator[Loopback]:
    """The internal host an attacker wants the service to reach."""
    with loopback() as server:
        yield server


def disguises(port: int) -> list[str]:
    """The internal host (and others off the list) as a fhirServer, spelled every way a
    URL parser might take for the allowed server or normalise into a private address."""
    return [
        f"http://127.0.0.1:{port}/fhir",
        f"http://2130706433:{port}/fhir",  # decimal
        f"http://0177.0.0.1:{port}/fhir",  # octal
        f"http://0x7f.0.0.1:{port}/fhir",  # hex
        f"http://0x7f000001:{port}/fhir",
        f"http://127.1:{port}/fhir",
        f"http://[::ffff:127.0.0.1]:{port}/fhir",  # IPv6-mapped
        f"http://[::1]:{port}/fhir",
        f"http://localhost:{port}/fhir",
        f"http://localtest.me:{port}/fhir",  # a public name for 127.0.0.1
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1",
        f"https://fhir.allowed.example@127.0.0.1:{port}/r4",  # user info
        f"https://fhir.allowed.example:443@127.0.0.1:{port}/r4",
        f"https://127.0.0.1:{port}\\@fhir.allowed.example/r4",  # backslash
        f"https://127.0.0.1:{port}#@fhir.allowed.example/r4",
        f"https://127.0.0.1:{port}?@fhir.allowed.example/r4",
        "https://fhir.allowed.example.attacker.test/r4",  # suffix
        "https://fhir.allowed.examp\u0142e/r4",  # look-alike letter
        "https://fhir.allowed.example./r4",  # trailing dot
        "https://fhir.allowed.example/r4/../../admin",
        "https://fhir.allowed.example/r4?_format=xml",
        "https://fhir.allowed.example:8443/r4",
        "http://fhir.allowed.example/r4",  # scheme downgrade
        "https://fhir.allowed.example/r4%0d%0aHost:127.0.0.1",
        f"gopher://127.0.0.1:{port}/_GET",
        "file:///etc/passwd",
    ]


def _body(fhir_server: str, prefetch: dict[str, Any] | None = None) -> dict[str, Any]:
    body = hook_body(PATIENT, prefetch or {}, fhir_server, TOKEN)
    if prefetch is None:
        del body["prefetch"]
    return body


def _no_secrets(response: httpx.Response) -> None:
    """The token and the patient id appear nowhere in what the service answers."""
    shown = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
    for secret in SECRETS:
        assert secret not in shown, (secret, shown)


async def test_servers_off_the_allow_list_are_refused_before_any_lookup_or_connection(
    make_api: ApiFactory, internal: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[object] = []
    resolve = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    async with make_api(fhir_server_allow=[ALLOWED], cds_require_jwt=False) as api:
        for url in disguises(internal.port):
            response = await api.post(PATH, json=_body(url))
            # 403 from the allow-list; 422 where the URL is not even an http(s) URL
            assert response.status_code in (403, 422), (url, response.text)
            assert response.json()["resourceType"] == "OperationOutcome"
            _no_secrets(response)
    assert internal.connections == 0
    assert looked_up == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_from_an_allowed_server_is_not_followed(
    make_api: ApiFactory, internal: Loopback, status: int
) -> None:
    """Neither a CDS call's reads nor the REST route's follow the allowed server's redirect
    to another host: the call fails as a FHIR failure (502) and the other host sees no
    connection, so it never gets the bearer token either."""
    with loopback(lambda path: (status, {"Location": internal.origin + path}, b"")) as allowed:
        base = allowed.origin + "/fhir"
        async with make_api(
            fhir_base_url=base,
            fhir_token=SERVICE_TOKEN,
            fhir_retries=0,
            fhir_server_allow=[base],
            cds_require_jwt=False,
        ) as api:
            answers = [
                await api.post(PATH, json=_body(base)),
                await api.post(f"/patients/{PATIENT}/predict"),
            ]
    assert allowed.paths, "the allowed server was never asked"
    assert internal.connections == 0
    for response in answers:
        assert response.status_code == 502, response.text
        _no_secrets(response)


async def test_paging_links_to_another_host_are_not_followed(
    make_api: ApiFactory, internal: Loopback
) -> None:
    """A server's own searchset whose next link leaves it, and a prefetch Bundle whose next
    link names another host (absolute, scheme-relative, with user info): refused, with no
    connection to that host."""

    def paging(path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/fhir/Patient/"):
            body = f'{{"resourceType": "Patient", "id": "{PATIENT}", "birthDate": "1950"}}'
        else:
            link = f"{internal.origin}/fhir/Observation?page=2"
            body = (
                '{"resourceType": "Bundle", "type": "searchset", '
                f'"link": [{{"relation": "next", "url": "{link}"}}], "entry": []}}'
            )
        return 200, {"Content-Type": "application/fhir+json"}, body.encode()

    with loopback(paging) as allowed:
        base = allowed.origin + "/fhir"
        async with make_api(
            fhir_base_url=base, fhir_retries=0, fhir_server_allow=[base], cds_require_jwt=False
        ) as api:
            rest = await api.post(f"/patients/{PATIENT}/predict")
            assert rest.status_code == 502, rest.text
            _no_secrets(rest)
            for link in (
                f"{internal.origin}/fhir/Observation?page=2",
                f"//127.0.0.1:{internal.port}/fhir/Observation",
                f"http://127.0.0.1:{allowed.port}@127.0.0.1:{internal.port}/fhir/x",
                "../../../../x",
            ):
                response = await api.post(PATH, json=_body(base, _paged_prefetch(link)))
                assert response.status_code == 422, (link, response.text)
                _no_secrets(response)
    assert internal.connections == 0


def _paged_prefetch(next_link: str) -> dict[str, Any]:
    """A whole prefetch whose observations Bundle says there is more at ``next_link``."""
    prefetch: dict[str, Any] = {
        q.key: {"resourceType": "Bundle", "type": "searchset", "entry": []} for q in PREFETCH
    }
    prefetch["patient"] = {"resourceType": "Patient", "id": PATIENT, "birthDate": "1950"}
    prefetch["observations"]["link"] = [{"relation": "next", "url": next_link}]
    return prefetch
