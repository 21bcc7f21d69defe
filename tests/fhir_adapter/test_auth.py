"""SMART Backend Services and bearer auth against a real FHIR server that enforces them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_adapter.auth import BearerToken, SmartBackendAuth
from fhir_adapter.bulk import BulkExportClient
from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.errors import FhirUnauthorized
from fhir_adapter.files import ExportReader
from fhir_adapter.local_server import FhirServer, start_fhir_server
from fhir_adapter.upload import upload_record
from tests.conftest import LoadedServer
from tests.support.faults import FaultTransport

STATIC_TOKEN = "static-test-token"


@dataclass
class SmartServer:
    server: FhirServer
    rsa_pem: str
    ec_pem: str
    patient_id: str

    def smart(
        self, client_id: str, pem: str, alg: str, scope: str = "system/*.read"
    ) -> SmartBackendAuth:
        return SmartBackendAuth(
            client_id=client_id,
            private_key_pem=pem,
            fhir_base_url=self.server.base_url,
            algorithm=alg,  # type: ignore[arg-type]
            scope=scope,
        )


def _pems(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, folder: Path, name: str) -> str:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / f"{name}.pub.pem").write_bytes(public)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def smart_server(
    sekmet_executable: Path,
    tmp_path_factory: pytest.TempPathFactory,
    loaded_fhir: LoadedServer,
) -> Iterator[SmartServer]:
    folder = tmp_path_factory.mktemp("smart")
    rsa_pem = _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048), folder, "rsa")
    ec_pem = _pems(ec.generate_private_key(ec.SECP384R1()), folder, "ec")
    clients = [
        {
            "client_id": "rsa-client",
            "public_key_path": str(folder / "rsa.pub.pem"),
            "scopes": "system/*.*",
        },
        {
            "client_id": "ec-client",
            "public_key_path": str(folder / "ec.pub.pem"),
            "scopes": "system/*.read",
        },
    ]
    server = start_fhir_server(
        sekmet_executable,
        folder / "server",
        server_auth={
            "types": ["smart", "bearer"],
            "tokens": [STATIC_TOKEN],
            "smart_clients": clients,
        },
    )
    record = loaded_fhir.records[0]
    smart = SmartServer(server, rsa_pem, ec_pem, record.patient_id)
    yield smart
    server.stop()


@pytest.fixture(scope="module")
async def seeded(smart_server: SmartServer, loaded_fhir: LoadedServer) -> SmartServer:
    """The server holds one patient, written with a write-scoped SMART client."""
    writer = smart_server.smart("rsa-client", smart_server.rsa_pem, "RS384", "system/*.*")
    config = FhirClientConfig(base_url=smart_server.server.base_url, auth=writer)
    async with FhirClient(config) as client:
        await upload_record(client, loaded_fhir.records[0])
    return smart_server


@pytest.mark.parametrize(("client_id", "alg"), [("rsa-client", "RS384"), ("ec-client", "ES384")])
async def test_smart_backend_services_reads_a_patient(
    seeded: SmartServer, client_id: str, alg: str
) -> None:
    pem = seeded.rsa_pem if alg == "RS384" else seeded.ec_pem
    transport = FaultTransport(lambda request, n: None)
    config = FhirClientConfig(
        base_url=seeded.server.base_url, auth=seeded.smart(client_id, pem, alg)
    )
    async with FhirClient(config, transport=transport) as client:
        record = await client.fetch_patient(seeded.patient_id)
    assert record.patient is not None
    assert record.resources
    token_calls = [r for r in transport.requests if r.url.path == "/auth/token"]
    assert len(token_calls) == 1, "the access token is fetched once and reused"
    assert len(transport.requests) > 5


async def test_client_assertion_follows_the_spec(seeded: SmartServer) -> None:
    auth = seeded.smart("rsa-client", seeded.rsa_pem, "RS384")
    first = auth.client_assertion("https://auth.example/token")
    second = auth.client_assertion("https://auth.example/token")
    claims = jwt.decode(first, options={"verify_signature": False})
    header = jwt.get_unverified_header(first)
    assert header["alg"] == "RS384"
    assert claims["iss"] == claims["sub"] == "rsa-client"
    assert claims["aud"] == "https://auth.example/token"
    assert 0 < claims["exp"] - time.time() <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_only_rs384_and_es384_are_allowed() -> None:
    with pytest.raises(ValueError, match="RS384 or ES384"):
        SmartBackendAuth(
            client_id="c",
            private_key_pem="k",
            fhir_base_url="http://x",
            algorithm="HS256",  # type: ignore[arg-type]
        )


async def test_a_401_fetches_a_fresh_token_once(seeded: SmartServer) -> None:
    rejected: list[httpx.Request] = []

    def reject_first_fhir_call(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.url.path.startswith("/fhir/Patient") and not rejected:
            rejected.append(request)
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        return None

    transport = FaultTransport(reject_first_fhir_call)
    auth = seeded.smart("ec-client", seeded.ec_pem, "ES384")
    config = FhirClientConfig(base_url=seeded.server.base_url, auth=auth)
    async with FhirClient(config, transport=transport) as client:
        patient = await client.read("Patient", seeded.patient_id)
    assert patient["id"] == seeded.patient_id
    assert sum(r.url.path == "/auth/token" for r in transport.requests) == 2


async def test_unregistered_key_is_refused_by_the_token_endpoint(seeded: SmartServer) -> None:
    stranger = (
        ec.generate_private_key(ec.SECP384R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    config = FhirClientConfig(
        base_url=seeded.server.base_url, auth=seeded.smart("ec-client", stranger, "ES384")
    )
    async with FhirClient(config) as client:
        with pytest.raises(FhirUnauthorized, match="token request refused"):
            await client.read("Patient", seeded.patient_id)


async def test_no_credentials_are_unauthorised(seeded: SmartServer) -> None:
    async with FhirClient(FhirClientConfig(base_url=seeded.server.base_url)) as client:
        with pytest.raises(FhirUnauthorized) as caught:
            await client.read("Patient", seeded.patient_id)
    assert caught.value.status == 401


async def test_static_bearer_token(seeded: SmartServer) -> None:
    good = FhirClientConfig(base_url=seeded.server.base_url, auth=BearerToken(STATIC_TOKEN))
    async with FhirClient(good) as client:
        assert (await client.read("Patient", seeded.patient_id))["id"] == seeded.patient_id
    bad = FhirClientConfig(base_url=seeded.server.base_url, auth=BearerToken("wrong"))
    async with FhirClient(bad) as client:
        with pytest.raises(FhirUnauthorized):
            await client.read("Patient", seeded.patient_id)


async def test_bulk_export_downloads_with_the_token_when_required(
    seeded: SmartServer, tmp_path: Path
) -> None:
    auth = seeded.smart("ec-client", seeded.ec_pem, "ES384")
    config = FhirClientConfig(base_url=seeded.server.base_url, auth=auth)
    async with FhirClient(config) as client:
        bulk = BulkExportClient(client, poll_interval=0.2)
        manifest = await bulk.export(tmp_path / "export", "patient", types=("Patient",))
    assert manifest.requires_access_token
    records = list(ExportReader(tmp_path / "export").records())
    assert [r.patient_id for r in records] == [seeded.patient_id]
