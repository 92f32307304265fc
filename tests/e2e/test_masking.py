"""Secret masking as a person meets it: a workspace with .env, a key, a secrets/ directory
and ordinary files; inside the container the secrets are empty and read-only, the rest is
as on the host; the start names what was masked; a project's .coi.toml can add patterns
but not remove any; a persistent container's masks follow the workspace at every start.
Run as the normal test user against the real daemon."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SECRET = "TOKEN=host-secret-7d1f"


def own(user, root: Path) -> None:
    for path in (root, *root.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def project(user, workspace: Path, extra: dict[str, str] | None = None) -> Path:
    files = {".env": SECRET + "\n", "a.pem": "-----BEGIN PRIVATE KEY----- host-secret-7d1f\n",
             "secrets/x": "host-secret-7d1f\n", "src/ok.txt": "plain text\n", **(extra or {})}
    for rel, text in files.items():
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text(text)
    own(user, workspace)
    return workspace


def snapshot(workspace: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workspace)): p.read_bytes() for p in sorted(workspace.rglob("*")) if p.is_file()}


def run_inside(user, workspace: Path, script: str, *args: str):
    """``script`` as code in a fresh session container: (captured JSON, coi's stderr)."""
    proc = user.run(["run", "--capture", *args, "--", "sh", "-c", script], cwd=workspace)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout), proc.stderr


PROBE = """
printf 'env=[%s]\\n' "$(cat .env)"
printf 'pem=[%s]\\n' "$(cat a.pem)"
printf 'ok=[%s]\\n' "$(cat src/ok.txt)"
printf 'secrets=[%s]\\n' "$(ls -A secrets)"
echo overwrite > .env 2>/dev/null && echo wrote-env
echo more >> a.pem 2>/dev/null && echo wrote-pem
touch secrets/new 2>/dev/null && echo wrote-secrets
rm -f .env 2>/dev/null; test -e .env && echo env-still-there
echo changed > src/ok.txt && echo wrote-ok
"""


def test_masked_files_are_empty_and_read_only_inside_and_unchanged_on_the_host(session_user, workspace):
    project(session_user, workspace)
    before = snapshot(workspace)
    result, stderr = run_inside(session_user, workspace, PROBE)
    out = result["stdout"].splitlines()
    assert "env=[]" in out and "pem=[]" in out and "secrets=[]" in out, result
    assert "ok=[plain text]" in out
    assert not {"wrote-env", "wrote-pem", "wrote-secrets"} & set(out), out
    assert "env-still-there" in out and "wrote-ok" in out
    assert "host-secret-7d1f" not in result["stdout"] + result["stderr"]
    assert "Masked 3 path(s), empty and read-only in the container: .env, a.pem, secrets/" in stderr
    after = snapshot(workspace)
    assert after.pop("src/ok.txt") == b"changed\n"  # the rest of the workspace is the agent's as ever
    before.pop("src/ok.txt")
    assert after == before  # the secrets on the host are untouched


def test_a_project_can_add_patterns_but_not_remove_or_unmask_any(session_user, workspace):
    project(session_user, workspace, {"db.secret": "host-secret-7d1f\n", ".coi.toml": (
        '[security]\nmasked_paths = ["*.secret"]\n')})
    result, stderr = run_inside(session_user, workspace, "cat db.secret .env src/ok.txt")
    assert result["stdout"] == "plain text\n", result
    assert "db.secret" in stderr and ".env" in stderr
    # A list without the defaults removes none of them.
    (workspace / ".coi.toml").write_text('[security]\nmasked_paths = []\n')
    result, _ = run_inside(session_user, workspace, "cat .env a.pem")
    assert result["stdout"] == "", result
    # Unmasking is the person's own decision, never the project's.
    (workspace / ".coi.toml").write_text('[security]\nmasked_paths = ["!.env"]\n')
    result, stderr = run_inside(session_user, workspace, "cat .env")
    assert result["stdout"] == "" and "cannot unmask" in stderr, (result, stderr)


def test_the_persons_own_config_can_unmask(session_user, workspace):
    project(session_user, workspace, {".env.example": "TOKEN=\n"})
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()
    try:
        config.write_text(original + '\n[security]\nmasked_paths = [".env", ".env.*", "!.env.example"]\n')
        result, stderr = run_inside(session_user, workspace, "cat .env.example .env a.pem")
        assert result["stdout"] == "TOKEN=\n-----BEGIN PRIVATE KEY----- host-secret-7d1f\n", result
        assert "Masked 1 path(s)" in stderr
    finally:
        config.write_text(original)


def test_files_git_already_holds_are_not_masked(session_user, workspace):
    project(session_user, workspace, {".env.example": "TOKEN=\n"})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for args in (["init", "-q"], ["add", ".env.example"], ["commit", "-qm", "example"]):
        proc = subprocess.run(session_user.argv([*git, *args]), cwd=workspace, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    result, stderr = run_inside(session_user, workspace, "cat .env.example .env")
    assert result["stdout"] == "TOKEN=\n", result  # the agent reads it from .git anyway
    assert "Masked 3 path(s), empty and read-only in the container: .env, a.pem, secrets/" in stderr


def test_a_persistent_containers_masks_follow_the_workspace_at_each_start(session_user, workspace, incus):
    project(session_user, workspace)
    name = session_user.background(workspace, "--persistent", "--debug")["container"]
    try:
        def cat(rel: str) -> str:
            proc = session_user.run(["container", "exec", name, "--user", "1000", "--capture", "--",
                                     "sh", "-c", f"cat {shlex.quote(rel)} 2>&1"], cwd=workspace)
            return json.loads(proc.stdout)["stdout"]
        assert cat(".env") == ""
        # Files that appear later are masked at the next start, and gone ones unmasked.
        (workspace / "new.key").write_text("host-secret-7d1f\n")
        own(session_user, workspace)
        (workspace / "a.pem").unlink()
        assert "host-secret-7d1f" in cat("new.key")  # not yet: covered at the next start
        assert session_user.run(["shutdown", name, "--timeout", "20"], cwd=workspace).returncode == 0
        proc = session_user.run(["shell", "--background", "--persistent", "--debug"], cwd=workspace)
        assert proc.returncode == 0 and f"Reusing persistent container {name}" in proc.stderr, proc.stderr
        assert cat("new.key") == ""
        paths = sorted(d["path"] for n, d in incus.instance(name)["devices"].items() if n.startswith("coi-mask-"))
        assert paths == ["/workspace/.env", "/workspace/new.key", "/workspace/secrets"]
    finally:
        session_user.run(["kill", name], cwd=workspace)
