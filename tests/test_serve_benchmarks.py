"""The defender's benchmarks run end to end on a small synthetic pool and report every figure they promise
(benchmarks/serve_cost.py, benchmarks/flood.py; their measured output is in benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from captcha_service_support import make_pool

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_json(script: str, *args) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args), "--json"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_serve_cost_measures_the_servers_cpu_per_challenge(tmp_path):
    make_pool(tmp_path / "pool", cats=20, dogs=20)
    out = run_json("serve_cost.py", "--data", tmp_path / "pool", "--pool", 40, "--challenges", 30, "--warmup", 5,
                   "--arms", "1,2")
    assert set(out["runs"]) == {"this: in-process, 1 worker, 1 client", "this: in-process, 1 worker, 8 clients"}
    assert out["server_cpu_ms_per_challenge"] == out["runs"]["this: in-process, 1 worker, 8 clients"][
        "server_cpu_ms_per_challenge"] > 0
    for run in out["runs"].values():
        assert run["challenges"] == 30 and run["statuses"] == {"200": 30 * 14}  # every request answered
        assert run["challenges_per_second_per_core"] == pytest.approx(1000 / run["server_cpu_ms_per_challenge"])
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
        assert run["image_cache"]["entries"] == 40 and run["renderer"]  # the whole pool cached after the warm-up
    assert out["floor"]["jpeg_encode_us"] > 0 and out["machine"]["cpu"]["int8_kernels"]["path"]


@pytest.mark.slow
def test_flood_reports_refusal_cost_people_and_bounded_tables(tmp_path):
    make_pool(tmp_path / "pool", cats=20, dogs=20)
    out = run_json("flood.py", "--data", tmp_path / "pool", "--pool", 40, "--seconds", 3, "--rate", 500,
                   "--refusals", 2000, "--addresses", 300, "--hoarders", 30, "--max-challenges", 100,
                   "--store-refusals", 20000)
    assert out["flood"]["flood_statuses"]["429"] > 0 and "429 without Retry-After" not in out["flood"]["flood_statuses"]
    assert out["unpaced"]["statuses"]["429"] >= 2000 and out["unpaced"]["server_us_per_request"] > 0
    assert out["baseline"]["people"]["succeeded"] == out["baseline"]["people"]["challenges"] > 0
    assert out["hoarding"]["outstanding"] == 100  # 300 hoarded: the table is full...
    assert out["hoarding"]["people_then"]["succeeded"] == out["hoarding"]["people_then"]["challenges"] > 0  # ...yet
    assert out["server_log"] == {"tracebacks": 0, "error_lines": 0, "5xx_in_log": 0}
    memory = out["store_memory"]
    assert memory["outstanding"] == memory["max_challenges"] and memory["kib_after_refusals"] < 64
