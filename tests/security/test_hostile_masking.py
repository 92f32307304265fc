"""Secret masking against both attackers.

The project plays with what it ships: links named like secrets that point at the host's
files (/etc/shadow, ~/.ssh), a directory link to the person's home, a FIFO, a hostile
.git (an index, an include of a FIFO in its config). coi's scan must never open or look
up anything outside the workspace, and never mount anything the project chose: every mask
comes from coi's own empty file or directory and lands under /workspace. These run with
no daemon (marker unit).

The agent plays as root in its container, on the real daemon (marker security): as code
it tries umount, a user namespace of its own, a bind of /workspace without the masks,
/proc/self/root, hard links, writes; as root (it has sudo) it lifts a mask, which
docs/security.md says it can, and fills coi's empty file; coi starts afresh next time.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from coi.config.schema import DEFAULT_MASKED_PATHS
from coi.sessions import masks

HOST_MARKER = "host-only-9c41"  # in files outside the workspace: it must never reach a container


# ---- the project -------------------------------------------------------------------------

class Watch:
    """Every path coi's scan opens or looks up, as a real path (a directory descriptor it
    looks up from is shown by /proc), while it runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        readlink = os.readlink  # the watcher's own, not watched

        def where(path, dir_fd) -> str:
            if isinstance(path, int):
                return readlink(f"/proc/self/fd/{path}")
            base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
            return os.path.normpath(os.path.join(base, os.fsdecode(path)))

        for name in ("open", "lstat", "readlink", "stat", "scandir", "listdir"):
            real = getattr(os, name)

            def watched(path=".", *args, _real=real, dir_fd=None, **kw):
                self.seen.append(where(path, dir_fd))
                return _real(path, *args, **({"dir_fd": dir_fd} if dir_fd is not None else {}), **kw)
            monkeypatch.setattr(os, name, watched)


def hostile_project(tmp_path: Path) -> tuple[Path, Path]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(f"PRIVATE {HOST_MARKER}\n")
    (home / ".env").write_text(f"TOKEN={HOST_MARKER}\n")
    os.mkfifo(tmp_path / "fifo")
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / ".env").symlink_to("/etc/shadow")
    (ws / "id_rsa").symlink_to(home / ".ssh" / "id_rsa")
    (ws / "secrets").symlink_to(home / ".ssh")
    (ws / "config").symlink_to(home)  # config/.env would be the home's .env
    (ws / ".env.local").symlink_to("../home/.env")  # leaves /workspace in the container
    (ws / "pipe.key").symlink_to(tmp_path / "fifo")
    os.mkfifo(ws / "own-pipe.pem")
    (ws / "src").mkdir()
    (ws / "src" / "ok.txt").write_text("ok\n")
    return ws, home


@pytest.mark.unit
def test_the_scan_never_looks_outside_the_workspace(tmp_path, monkeypatch):
    ws, home = hostile_project(tmp_path)
    watch = Watch(monkeypatch)
    result = masks.scan(ws, [*DEFAULT_MASKED_PATHS, "config/*", "/config/.env"])
    monkeypatch.undo()
    real_ws = os.path.realpath(ws)
    outside = [p for p in watch.seen if p != real_ws and not p.startswith(real_ws + "/")]
    assert outside == [], outside
    assert f"{real_ws}/.env" in watch.seen  # the watch saw the scan look at the links
    assert result.masks == ()  # every link leads out; the FIFO is no file to mask
    assert sorted(result.elsewhere) == [".env", ".env.local", "id_rsa", "pipe.key", "secrets"]


@pytest.mark.unit
def test_masks_come_only_from_coi_s_sources_and_land_only_in_the_workspace(tmp_path):
    ws, _ = hostile_project(tmp_path)
    (ws / "real.pem").write_text("x")
    (ws / "inner").mkdir()
    (ws / "inner" / "id_ed25519").write_text("x")
    (ws / "ln.key").symlink_to("inner/id_ed25519")
    (ws / "dots.key").symlink_to("src/../../project/src/ok.txt")  # up and out of /workspace in the container
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    found, devices = masks.plan(state, ws, DEFAULT_MASKED_PATHS, "h")
    assert [m.shown for m in found.masks] == ["inner/id_ed25519", "real.pem"]
    sources = {str(state / "masks" / "h" / "empty"), str(state / "masks" / "h" / "empty.d")}
    for device in devices.values():
        assert device["source"] in sources and device["readonly"] == "true"
        path = device["path"]
        assert path.startswith("/workspace/") and ".." not in path.split("/")
    assert "dots.key" in found.elsewhere


@pytest.mark.unit
def test_a_fifo_named_like_a_secret_never_blocks_the_scan(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    os.mkfifo(ws / ".env")
    (ws / ".git").mkdir()
    done = threading.Event()
    threading.Thread(target=lambda: (masks.scan(ws, DEFAULT_MASKED_PATHS), done.set()), daemon=True).start()
    assert done.wait(10), "the scan hung on a FIFO"


def git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "p",
           "GIT_AUTHOR_EMAIL": "p@example.invalid", "GIT_COMMITTER_NAME": "p", "GIT_COMMITTER_EMAIL": "p@example.invalid"}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


@pytest.mark.unit
def test_a_hostile_git_directory_cannot_unmask_a_secret(tmp_path):
    """The project ships .git: an index that lists .env (its own harmless version), a config
    that includes a FIFO and a file of the person's. The person's real .env stays masked;
    git never reads the project's config."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".env").write_text("TOKEN=placeholder\n")
    git(ws, "init", "-q")
    git(ws, "add", ".env")
    git(ws, "commit", "-qm", "placeholder env")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "theirs").write_text(f"[core]\n\tfsmonitor = touch {tmp_path}/ran\n")
    with open(ws / ".git" / "config", "a") as fh:
        fh.write(f"[include]\n\tpath = {tmp_path}/fifo\n\tpath = {tmp_path}/theirs\n")
    (ws / ".env").write_text(f"TOKEN={HOST_MARKER}\n")  # the person puts the real secret in
    result = masks.scan(ws, DEFAULT_MASKED_PATHS)
    assert [m.rel for m in result.masks] == [".env"] and result.in_git == ()
    assert result.seconds < 3  # the FIFO in the config was never opened
    assert not (tmp_path / "ran").exists()
    (ws / ".env").write_text("TOKEN=placeholder\n")  # back as committed: git holds it, nothing to hide
    assert masks.scan(ws, DEFAULT_MASKED_PATHS).in_git == (".env",)


# ---- the agent, on the real daemon -----------------------------------------------------------

def own(user, root: Path) -> None:
    for path in (root, *root.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


@pytest.fixture
def masked_session(session_user, workspace):
    """A running persistent session of a workspace with .env, a.pem, secrets/x, src/ok.txt."""
    for rel, text in {".env": f"TOKEN={HOST_MARKER}\n", "a.pem": f"{HOST_MARKER}\n",
                      "secrets/x": f"{HOST_MARKER}\n", "src/ok.txt": "ok\n"}.items():
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text(text)
    own(session_user, workspace)
    name = session_user.background(workspace, "--persistent", "--debug")["container"]
    yield session_user, workspace, name
    session_user.run(["kill", name], cwd=workspace)


def inside(user, workspace: Path, name: str, script: str, *, root: bool = False) -> dict:
    prefix = ["--user", "0"] if root else ["--user", "1000", "--group", "1000"]
    proc = user.run(["container", "exec", name, *prefix, "--capture", "--", "sh", "-c", script], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


AS_CODE = r"""
cd /workspace
try() {
  label=$1; shift
  if out=$("$@" 2>&1); then printf '%s ok [%s]\n' "$label" "$(printf %s "$out" | tr '\n' ' ')"
  else echo "$label refused"; fi
}
try cat cat .env
try proc-self cat /proc/self/root/workspace/.env
try proc-1 cat /proc/1/root/workspace/.env
try umount umount /workspace/.env
try write sh -c 'echo x > /workspace/.env'
try hardlink ln /workspace/.env /workspace/hl
try rename mv /workspace/.env /workspace/moved
try chmod chmod 666 /workspace/.env
try userns-umount unshare -Urm sh -c 'umount /workspace/.env && cat /workspace/.env'
try userns-bind unshare -Urm sh -c 'mkdir -p /tmp/m && mount --bind /workspace /tmp/m && cat /tmp/m/.env'
try userns-remount unshare -Urm sh -c 'mount -o remount,rw,bind /workspace/.env && echo x > /workspace/.env'
try secrets ls -A secrets
try ok cat src/ok.txt
try host-side ls /var/lib/incus
"""


def test_the_agent_as_code_cannot_get_past_a_mask(masked_session):
    user, workspace, name = masked_session
    result = inside(user, workspace, name, AS_CODE)
    out = result["stdout"]
    assert HOST_MARKER not in out + result["stderr"], out
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["cat"] == "ok []" and lines["proc-self"] == "ok []" and lines["secrets"] == "ok []"
    assert lines["ok"] == "ok [ok]"
    for attempt in ("umount", "write", "hardlink", "rename", "chmod", "userns-umount", "userns-bind",
                    "userns-remount", "host-side"):
        assert lines[attempt] == "refused", (attempt, out)
    assert (workspace / ".env").read_text() == f"TOKEN={HOST_MARKER}\n"


def test_nothing_outside_the_workspace_reaches_the_container(session_user, workspace, incus):
    """The project's links to the person's files: none is followed, none is mounted; inside
    they lead into the container's own files."""
    ssh = session_user.home / ".ssh-coi-test"
    ssh.mkdir(exist_ok=True)
    (ssh / "id_rsa").write_text(f"PRIVATE {HOST_MARKER}\n")
    own(session_user, ssh)
    try:
        (workspace / ".env").symlink_to("/etc/shadow")
        (workspace / "id_rsa").symlink_to(ssh / "id_rsa")
        (workspace / "secrets").symlink_to(ssh)
        own(session_user, workspace)
        name = session_user.background(workspace, "--debug")["container"]
        try:
            devices = incus.instance(name)["devices"]
            assert not [d for d in devices if d.startswith("coi-mask-")]  # every link leads out: nothing to mask
            assert not [d for d in devices.values() if str(ssh) in d.get("source", "")]
            head, tail = HOST_MARKER.rsplit("-", 1)  # the marker itself is never on the command line
            found = inside(session_user, workspace, name, f"m={head}; grep -rls --exclude-dir=proc --exclude-dir=sys "
                                                            f"--exclude-dir=dev \"$m-{tail}\" / || true", root=True)
            assert found["stdout"] == "", found
        finally:
            session_user.run(["kill", name], cwd=workspace)
    finally:
        for path in sorted(ssh.rglob("*"), reverse=True):
            path.unlink()
        ssh.rmdir()


def test_root_in_the_container_can_lift_a_mask_as_docs_security_says(masked_session):
    """The real guarantee: a mask is a bind mount the container's root can remove (the agent
    has sudo). If this ever fails, masks became stronger: update docs/security.md."""
    user, workspace, name = masked_session
    result = inside(user, workspace, name, "umount /workspace/.env && cat /workspace/.env", root=True)
    assert HOST_MARKER in result["stdout"], (
        f"root could not lift the mask ({result}); docs/security.md understates masking: update it")


def test_a_mask_source_root_filled_is_empty_again_at_the_next_start(masked_session):
    user, workspace, name = masked_session
    state = user.home / ".coi" / "masks"
    script = ("mount -o remount,rw,bind /workspace/a.pem && echo planted > /workspace/a.pem; "
              "mount -o remount,rw,bind /workspace/secrets && mkdir /workspace/secrets/planted; true")
    inside(user, workspace, name, script, root=True)
    assert user.run(["shutdown", name, "--timeout", "20"], cwd=workspace).returncode == 0
    proc = user.run(["shell", "--background", "--persistent", "--debug"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = inside(user, workspace, name, "cat a.pem .env; ls -A secrets")
    assert result["stdout"] == "", result
    for source in state.glob("*/empty"):
        assert source.read_bytes() == b""
    for source in state.glob("*/empty.d"):
        assert list(source.iterdir()) == []
    assert (workspace / "a.pem").read_text() == f"{HOST_MARKER}\n"  # the host's file was never the target


def test_coi_never_mounts_a_path_the_workspace_chose(masked_session, incus):
    user, workspace, name = masked_session
    devices = incus.instance(name)["devices"]
    state = str(user.home / ".coi" / "masks") + "/"
    masks_seen = {n: d for n, d in devices.items() if n.startswith("coi-mask-")}
    assert sorted(d["path"] for d in masks_seen.values()) == ["/workspace/.env", "/workspace/a.pem",
                                                              "/workspace/secrets"]
    assert all(d["source"].startswith(state) and d["readonly"] == "true" for d in masks_seen.values())
