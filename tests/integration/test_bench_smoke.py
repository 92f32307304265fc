"""The benchmark suite (bench/) runs every case once and leaves nothing behind.

One repetition, no warm-up, about two minutes. Nothing here is timed: the
targets are read from docs/benchmarks.md, never asserted in the tests. Skip it
locally with ``-m "not bench"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.bench]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "coi-bench-"
CASES = {"cli_start", "doctor", "list_0_text", "list_0_json", "list_20_text", "list_20_json", "run", "session",
         "parallel", "network_open", "network_restricted", "network_allowlist", "network_allowlist_by_name",
         "network_allowlist_by_name_proxy_running", "proxy_tls_setup", "proxy_http_setup", "proxy_https_download",
         "proxy_http_download", "build", "build_launch", "branch_spare", "branch_no_spare", "snapshot_create",
         "snapshot_restore_running", "snapshot_restore_stopped"}
WITH_FLOOR = CASES - {"doctor", "network_open"}


def _incus_json(*args: str):
    return json.loads(subprocess.run(["incus", *args, "--format", "json"], capture_output=True, text=True,
                                     check=True).stdout)


@pytest.fixture(scope="module")
def bench_run(incus, sandbox_image, tmp_path_factory):
    """One smoke run of the suite for both tests (the build case on the small test image and the
    branch case on a small generated repository, to stay quick)."""
    if os.geteuid() != 0:
        pytest.skip("the benchmark suite runs as root (sudo bench/run)")
    if shutil.which("coi") is None:
        pytest.skip("coi is not installed (scripts/install.sh)")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--repeat", "1", "--warmup", "0",
                           "--json", str(out), "--build-base", sandbox_image,
                           "--branch-repo-files", "2000", "--branch-repo-mb", "20"],
                          capture_output=True, text=True, timeout=900)
    return proc, out


def test_every_case_runs_once_and_reports(bench_run):
    proc, out = bench_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("Machine: ") and "cores" in first and "memory" in first and "storage pool" in first
    result = json.loads(out.read_text())
    assert CASES <= set(result["cases"]), sorted(CASES - set(result["cases"]))
    assert result["failures"] == []
    for key, case in result["cases"].items():
        assert case["status"] in ("ok", "not available"), (key, case["note"])
        if case["status"] != "ok":
            continue
        assert case["coi"]["n"] >= 1 and case["coi"]["min"] <= case["coi"]["median"] <= case["coi"]["max"], key
        if key in WITH_FLOOR:
            assert case["floor"]["n"] >= 1 and case["ratio"] is not None, key
    assert "| case | coi command |" in proc.stdout


def test_nothing_is_left_behind(bench_run):
    proc, out = bench_run
    result = json.loads(out.read_text())
    assert result["left_behind"] == []
    assert [i["name"] for i in _incus_json("list") if i["name"].startswith(PREFIX)] == []
    aliases = [a["name"] for img in _incus_json("image", "list") for a in img.get("aliases") or []]
    assert [a for a in aliases if a.startswith(PREFIX)] == []
    assert not Path(result["tmp"]).exists()
