"""coi doctor as a normal user runs it: the JSON report and its exit code, and --fix
saying which repair needs 'sudo coi doctor --fix' instead of failing."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.e2e

EXIT = {"ok": 0, "warning": 1, "error": 2}
STATUSES = {"ok", "warning", "error", "skip"}


def test_doctor_json_as_a_normal_user(coi_user):
    proc = coi_user.run(["doctor", "--format", "json"])
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert list(report) == ["status", "checks", "fixes"] and report["fixes"] == []
    assert proc.returncode == EXIT[report["status"]]
    for check in report["checks"]:
        assert list(check) == ["name", "status", "message", "fix"] and check["status"] in STATUSES, check
    seen = {c["status"] for c in report["checks"]}
    assert report["status"] == ("error" if "error" in seen else "warning" if "warning" in seen else "ok")


def test_a_fix_that_needs_root_says_to_use_sudo(coi_user, address_lock_away):
    proc = coi_user.run(["doctor", "--fix", "--format", "json"])
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    [fix] = [f for f in report["fixes"] if f["checks"] == ["address lock"]]
    assert fix["status"] == "needs_root" and "sudo coi doctor --fix" in fix["message"], fix
    [check] = [c for c in report["checks"] if c["name"] == "address lock"]
    assert check["status"] == "warning" and "sudo coi doctor --fix" in check["fix"]
    assert proc.returncode == EXIT[report["status"]] >= 1
    assert not os.path.lexists(address_lock_away)  # nothing was tried as this user

    text = coi_user.run(["doctor", "--fix"])
    assert "Traceback" not in text.stdout + text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("not fixed: address lock"))
    assert "sudo coi doctor --fix" in line and "sudo coi setup" in line
    assert text.returncode == proc.returncode


def test_bash_completion_offers_doctor_s_flags(coi_user):
    script = ('eval "$(coi completion bash)"; COMP_WORDS=(coi doctor --f); COMP_CWORD=2; _coi; '
              'printf "%s\\n" "${COMPREPLY[@]}"')
    proc = subprocess.run(coi_user.argv(["bash", "-c", script]), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {"--fix", "--format"} <= set(proc.stdout.split())
