"""The floor: the same work as coi, done with bare ``incus`` commands.

Each function here runs a fixed sequence of ``incus`` processes and returns
its wall time. Containers get exactly the config and devices coi would give
them (``coi.sessions.container_spec`` of the installed coi, so the workspace
mount mode is the same: ``shift=true`` or ``raw.idmap``), from the same image
and profile.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from pathlib import Path
from typing import Mapping

from measure import BenchError, poll, run

INCUS = "incus"
PROFILE = "coi"
CODE_UID = 1000
CODE_HOME = "/home/code"
TMUX_SOCKET = f"{CODE_HOME}/.tmux-coi.sock"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_CONFIG = {
    "security.nesting": "true",
    "security.syscalls.intercept.mknod": "true",
    "security.syscalls.intercept.setxattr": "true",
}
READY_TIMEOUT = 30.0
AGENT_TIMEOUT = 30.0


def session_spec(*, image: str, workspace: Path, slot: int, host_uid: int, host_gid: int,
                 shift: bool) -> tuple[dict[str, str], dict[str, dict[str, str]], str]:
    """(config, devices, source) of a session container, the way the installed coi makes it."""
    kwargs = dict(image=image, workspace=workspace, slot=slot, session_id=str(uuid.uuid4()), persistent=False,
                  tool="claude", mounts=[], storage=None, host_uid=host_uid, host_gid=host_gid,
                  code_uid=CODE_UID, shift=shift, base_config=CONTAINER_CONFIG)
    try:
        from coi.sessions import container_spec

        config, devices = container_spec(**kwargs)
        return dict(config), {k: dict(v) for k, v in devices.items()}, "coi.sessions.container_spec"
    except Exception:  # noqa: BLE001 - an installed coi with another signature: use the known shape
        config = dict(CONTAINER_CONFIG)
        config.update({"user.coi.workspace": str(workspace), "user.coi.slot": str(slot),
                       "user.coi.session_id": kwargs["session_id"], "user.coi.persistent": "false",
                       "user.coi.tool": "claude", "user.coi.image": image})
        if not shift:
            config["raw.idmap"] = f"uid {host_uid} {CODE_UID}\ngid {host_gid} {CODE_UID}"
        disk = {"type": "disk", **({"shift": "true"} if shift else {})}
        return config, {"workspace": {**disk, "source": str(workspace), "path": "/workspace"}}, "built-in copy"


def init(name: str, image: str, config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]]) -> None:
    """``incus init`` with config and devices in one request (JSON is YAML, read from stdin)."""
    spec = json.dumps({"config": dict(config), "devices": {k: dict(v) for k, v in devices.items()}})
    run([INCUS, "init", image, name, "--profile", PROFILE], stdin=spec).check()


def start(name: str) -> None:
    run([INCUS, "start", name]).check()


def delete(name: str) -> None:
    run([INCUS, "delete", "--force", name]).check()


def delete_quietly(name: str) -> None:
    run([INCUS, "delete", "--force", name])


def exec_argv(name: str, command: list[str], *, cwd: str = "/workspace",
              env: Mapping[str, str] | None = None) -> list[str]:
    """``incus exec`` as the container user ``code`` (uid 1000), never as root."""
    argv = [INCUS, "exec", name, "--user", str(CODE_UID), "--group", str(CODE_UID), "--cwd", cwd]
    for key, value in (env or {"HOME": CODE_HOME, "USER": "code", "PATH": DEFAULT_PATH}).items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, "--", *command]


def exec_until_ok(name: str, command: list[str], what: str, *, done: str = "", **kw) -> int:
    """Run ``command`` until it succeeds (a container that has just started may refuse
    exec for a moment); returns the number of attempts. An answer containing ``done``
    counts as success too: Incus may lose track of a command it did start, and the
    next try then finds its work done. A timeout names the first and the last failure."""
    failures: list[str] = []

    def ok() -> bool:
        proc = run(exec_argv(name, command, **kw))
        if proc.code != 0 and not (done and done in proc.stderr):
            failures.append(f"exit {proc.code}: {(proc.stderr or proc.stdout).strip()[:200]}")
            return False
        return True
    try:
        return poll(ok, timeout=READY_TIMEOUT, what=what)
    except BenchError as exc:
        raise BenchError(f"{exc} (first failure: {failures[0]}; last: {failures[-1]})") from None


# The command lines of the processes the tmux panes' shells have started. The
# agent runs as a child of the pane's ``bash -l -c "AGENT; exec bash -l"``
# (``pane_current_command`` keeps saying bash: a non-interactive shell starts
# no process group of its own). The image need not have procps: /proc is read.
_PANE_CHILDREN = (
    'for p in $(tmux -S "$1" list-panes -a -F "#{pane_pid}"); do '
    'for c in $(cat /proc/$p/task/*/children); do tr "\\0" " " < /proc/$c/cmdline; echo; done; done'
)


def pane_children(name: str) -> list[str]:
    argv = exec_argv(name, ["sh", "-c", _PANE_CHILDREN, "sh", TMUX_SOCKET], cwd=CODE_HOME)
    proc = run(argv)
    return [line for line in proc.stdout.splitlines() if line.strip()] if proc.code == 0 else []


def agent_running(name: str, binary: str) -> bool:
    """True once a process whose command line names the agent runs in a tmux pane."""
    return any(binary in line for line in pane_children(name))


def wait_agent(name: str, binary: str) -> int:
    return poll(lambda: agent_running(name, binary), timeout=AGENT_TIMEOUT,
                what=f"the agent ({binary}) to run in tmux in {name}")


# ---- floor sequences ------------------------------------------------------------


def one_shot(name: str, image: str, spec: tuple[dict, dict]) -> float:
    """create (with the workspace mount) + start + exec ``true`` as uid 1000 in /workspace + delete."""
    t0 = time.perf_counter()
    init(name, image, *spec)
    try:
        start(name)
        exec_until_ok(name, ["true"], f"exec in {name}")
    finally:
        delete(name)
    return time.perf_counter() - t0


def session_start(name: str, image: str, spec: tuple[dict, dict], agent: list[str]) -> float:
    """create + start + ``tmux new-session`` running the agent, until the agent runs.

    The container is left running; the caller deletes it (not timed).
    """
    t0 = time.perf_counter()
    init(name, image, *spec)
    start(name)
    start_agent(name, agent)
    return time.perf_counter() - t0


def start_agent(name: str, agent: list[str]) -> None:
    """``tmux new-session`` running the agent in a running container, until the agent runs."""
    env = {"HOME": CODE_HOME, "USER": "code", "PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    agent_env = {**env, "LOGNAME": "code", "SHELL": "/bin/bash", "TERM": "xterm-256color", "IS_SANDBOX": "1"}
    tmux = ["tmux", "-S", TMUX_SOCKET, "new-session", "-d", "-s", f"coi-{name}", "-c", "/workspace",
            "-x", "200", "-y", "50"]
    for key, value in agent_env.items():
        tmux += ["-e", f"{key}={value}"]
    tmux += ["bash", "-l", "-c", f"{shlex.join(agent)}; exec bash -l"]
    exec_until_ok(name, tmux, f"tmux in {name}", done="duplicate session", env=env)
    wait_agent(name, Path(agent[0]).name)


def snapshot_create(name: str, snapshot: str) -> float:
    """``incus snapshot create`` (stateless, as coi makes them)."""
    return run([INCUS, "snapshot", "create", name, snapshot]).check().seconds


def snapshot_restore(name: str, snapshot: str) -> float:
    """``incus snapshot restore``: Incus stops a running container for it and starts it again."""
    return run([INCUS, "snapshot", "restore", name, snapshot]).check().seconds


def snapshot_restore_session(name: str, snapshot: str, agent: list[str]) -> float:
    """``incus snapshot restore`` of a running session container + the agent again in tmux, until it runs."""
    t0 = time.perf_counter()
    snapshot_restore(name, snapshot)
    start_agent(name, agent)
    return time.perf_counter() - t0


def build(name: str, alias: str, base: str, line: str) -> float:
    """launch the base + exec the one-line script + stop + publish + delete the builder.

    Publishes uncompressed, like coi. The image is left for the caller to inspect and delete.
    """
    t0 = time.perf_counter()
    run([INCUS, "launch", base, name, "--profile", PROFILE,
         *(x for k, v in CONTAINER_CONFIG.items() for x in ("--config", f"{k}={v}"))]).check()
    try:
        proc = run([INCUS, "exec", name, "--", "sh", "-c", line])
        if proc.code != 0:
            # Just after start, exec may be refused for a moment: try again until it runs.
            poll(lambda: run([INCUS, "exec", name, "--", "sh", "-c", line]).code == 0,
                 timeout=READY_TIMEOUT, what=f"the script in {name}")
        run([INCUS, "stop", name]).check()
        run([INCUS, "publish", name, "--alias", alias, "--compression", "none"]).check()
    finally:
        delete_quietly(name)
    return time.perf_counter() - t0


def launch(image: str, name: str) -> float:
    """``incus launch`` of an image with coi's profile and config; the caller deletes it."""
    proc = run([INCUS, "launch", image, name, "--profile", PROFILE,
                *(x for k, v in CONTAINER_CONFIG.items() for x in ("--config", f"{k}={v}"))]).check()
    return proc.seconds


def image_fingerprint(alias: str) -> str | None:
    proc = run([INCUS, "query", f"/1.0/images/aliases/{alias}"])
    if proc.code != 0:
        return None
    return json.loads(proc.stdout).get("target")


def image_size(alias: str) -> int | None:
    fingerprint = image_fingerprint(alias)
    if fingerprint is None:
        return None
    proc = run([INCUS, "query", f"/1.0/images/{fingerprint}"]).check()
    return int(json.loads(proc.stdout).get("size") or 0)


def delete_image(alias: str) -> None:
    fingerprint = image_fingerprint(alias)
    if fingerprint is not None:
        run([INCUS, "image", "delete", fingerprint])


def status(name: str) -> str:
    """The container's status as Incus says it ("Running", "Stopped"...)."""
    proc = run([INCUS, "query", f"/1.0/instances/{name}"]).check()
    return json.loads(proc.stdout).get("status", "")


def instances() -> list[dict]:
    proc = run([INCUS, "list", "--format", "json"]).check()
    return json.loads(proc.stdout)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)
