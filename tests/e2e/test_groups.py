"""Every process coi starts as code has code's full group list, as a login would
(Incus's own user/group start it with none): the agent in tmux, coi run,
coi container exec --user 1000."""

from __future__ import annotations

import json

import pytest

from coi.wait import wait_for

pytestmark = pytest.mark.e2e


def test_coi_run_has_codes_groups(session_user, workspace):
    for capture in ([], ["--capture"]):
        proc = session_user.run(["run", *capture, "--", "id", "-Gn"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)["stdout"] if capture else proc.stdout
        assert "coi-extra" in out.split(), out


def test_the_agent_in_tmux_and_container_exec_have_codes_groups(session_user, workspace):
    name = session_user.background(workspace, "--debug")["container"]
    try:
        assert session_user.run(["tmux", "send", name, "id -Gn > /workspace/groups"]).returncode == 0
        wait_for(lambda: (workspace / "groups").exists() and (workspace / "groups").read_text(), timeout=20,
                 what="the shell in tmux to write its groups")
        assert "coi-extra" in (workspace / "groups").read_text().split()
        proc = session_user.run(["container", "exec", name, "--user", "1000", "--capture", "--", "id", "-Gn"])
        assert "coi-extra" in json.loads(proc.stdout)["stdout"].split(), proc.stdout
    finally:
        session_user.run(["kill", name])
