"""The wrk driver: the generated Lua script run by the real wrk against a local app that
counts what reached it, and the parser on wrk's real output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import wrk
from tests.bench.local_app import LocalApp

ROOT = Path(__file__).resolve().parents[2]
PATH = "/patients/{patient_id}/predict"

# wrk 4.1's output for a run of the generated script: its own report, then the script's line.
CAPTURED = """\
Running 1s test @ http://127.0.0.1:42953
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    42.21ms    8.77ms  48.61ms   95.65%
    Req/Sec    46.00      9.40    60.00     70.00%
  92 requests in 1.00s, 13.68KB read
  Non-2xx or 3xx responses: 31
Requests/sec:     91.69
Transfer/sec:     13.63KB
EHRMAMBA_WRK {"requests": 92, "duration_us": 1003410, "p50_us": 43936, "p95_us": 44841, \
"p99_us": 48611, "max_us": 48611, "connect": 0, "read": 2, "write": 0, "timeout": 3, \
"retry_after": 31, "statuses": {"200": 61, "429": 31}}
"""


@pytest.fixture(scope="module")
def wrk_installed() -> None:
    """wrk from Debian, as `ehrmamba bench throughput` needs it (CI runs as root)."""
    subprocess.run([str(ROOT / "scripts" / "install-load-tools")], check=True)
    wrk.require_wrk()


def test_the_parser_reads_the_scripts_line_and_ignores_wrks_report() -> None:
    result = wrk.parse(CAPTURED)
    assert result.requests == 92
    assert result.seconds == pytest.approx(1.00341)
    assert (result.median_ms, result.p95_ms, result.p99_ms, result.max_ms) == pytest.approx(
        (43.936, 44.841, 48.611, 48.611)
    )
    assert result.statuses == {200: 61, 429: 31}
    assert result.non_2xx == {429: 31}
    assert result.retry_after == 31
    assert result.socket_errors == {"connect": 0, "read": 2, "write": 0}
    assert result.timeouts == 3
    assert result.per_second == pytest.approx(92 / 1.00341)
    assert result.ok_per_second == pytest.approx(61 / 1.00341)


def test_output_without_the_scripts_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no EHRMAMBA_WRK line"):
        wrk.parse(CAPTURED.rsplit("EHRMAMBA_WRK", 1)[0])


def test_the_script_refuses_what_it_cannot_quote_plainly() -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        wrk.lua_script(PATH, ["é"], {})
    with pytest.raises(ValueError, match="no patient ids"):
        wrk.lua_script(PATH, [], {})
    quoted = wrk.lua_script(PATH, ['a"b\\c'], {})
    assert r'"a\"b\\c"' in quoted


@pytest.mark.usefixtures("wrk_installed")
def test_wrk_posts_to_every_id_in_turn_with_the_key_and_counts_answers_by_status(
    tmp_path: Path,
) -> None:
    ids = ["p1", "p2", "p3", "busy-4"]
    script = tmp_path / "predict.lua"
    script.write_text(wrk.lua_script(PATH, ids, {"X-API-Key": "secret-1"}))
    connections = 4
    with LocalApp() as app:
        result = wrk.run(app.url, script, connections=connections, seconds=1, timeout_s=5)
    sent = sum(app.by_id.values())
    assert set(app.by_id) == set(ids)
    # Each thread cycles through the list, so no id is asked more than once per thread
    # beyond any other.
    assert max(app.by_id.values()) - min(app.by_id.values()) <= 2
    assert app.keys == {"secret-1": sent}
    # wrk counts the answers it read; the server may have sent a few more to connections
    # wrk closed at the end of the run.
    assert result.requests == sum(result.statuses.values())
    assert sent - connections <= result.requests <= sent
    assert set(result.statuses) == {200, 429}
    assert app.refused - connections <= result.statuses[429] <= app.refused
    assert result.retry_after == result.statuses[429]
    assert result.timeouts == 0
    assert 0 < result.median_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
