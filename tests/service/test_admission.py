"""Admission: a worker refuses requests beyond its limit at once (429, Retry-After), before
any FHIR read, and takes new ones again as soon as places free up."""

from __future__ import annotations

import asyncio

import pytest

from service import metrics
from service.admission import Admission
from service.outcomes import ServiceError
from tests.conftest import LoadedServer
from tests.service.conftest import ApiFactory


def _refused() -> float:
    return float(metrics.QUEUE_REJECTIONS.labels("in_flight")._value.get())


async def test_places_are_held_for_the_block_and_freed_after_it() -> None:
    admission = Admission(2)
    async with admission.admit(), admission.admit():
        assert admission.active == 2
        with pytest.raises(ServiceError) as refused:
            async with admission.admit():
                pass
        assert refused.value.status == 429
        assert refused.value.headers == {"Retry-After": "1"}
    assert admission.active == 0
    with pytest.raises(RuntimeError):
        async with admission.admit():
            raise RuntimeError("a failing request frees its place too")
    assert admission.active == 0


async def test_requests_beyond_the_limit_are_refused_at_once(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    patients = [r.patient_id for r in loaded_fhir.records]
    async with make_api(fhir_base_url=loaded_fhir.base_url, max_in_flight=1) as api:
        before = _refused()
        answers = await asyncio.gather(*(api.post(f"/patients/{p}/predict") for p in patients))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] + [429] * (len(patients) - 1)
        for answer in answers:
            if answer.status_code == 429:
                assert answer.headers["Retry-After"] == "1"
                assert answer.json()["issue"][0]["code"] == "throttled"
        assert _refused() == before + len(patients) - 1
        again = await api.post(f"/patients/{patients[0]}/predict")
        assert again.status_code == 200, "the place is free again"
