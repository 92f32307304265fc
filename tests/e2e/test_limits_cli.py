"""``[limits] max_duration`` and ``[limits] disk`` with real sessions, as a normal user:
a session started with --background ends by itself at its deadline while nobody is
attached, and is saved; the host timer that keeps the time is gone afterwards; coi list
shows the limits, coi kill and coi clean take the timer along."""

from __future__ import annotations

import calendar
import json
import os
import signal
import time
from pathlib import Path

import pytest

from coi.wait import wait_for

from conftest import TEST_PREFIX
from terminal import Terminal

pytestmark = pytest.mark.e2e

TIMER = b"coi.sessions.timer"


def timers(name: str = TEST_PREFIX, *, prefix: bool = False) -> list[int]:
    """Host processes of coi's session timer for container ``name`` (with ``prefix``: for
    every container whose name starts with it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if TIMER in argv:
                container = (argv[argv.index(TIMER) + 1:] or [b""])[0].decode(errors="replace")
                if container == name or (prefix and container.startswith(name)):
                    found.append(int(entry))
    return found


def kill_test_timers() -> None:
    for pid in timers(prefix=True):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def limited(session_user):
    """The session user; ``limits(text)`` adds a [limits] table to their own config. The
    config and every test timer are put back or ended afterwards, also after failures."""
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()

    def limits(text: str) -> None:
        config.write_text(original + "\n[limits]\n" + text)
    yield session_user, limits
    config.write_text(original)
    kill_test_timers()


def gone(incus, name: str, *, timeout: float) -> None:
    wait_for(lambda: not incus.exists(name), timeout=timeout, what=f"{name} to be removed by its timer")


def test_a_background_session_ends_by_itself_at_its_max_duration_and_is_saved(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "5s"\n')
    started = time.monotonic()
    proc = user.run(["shell", "--background", "--debug", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    name, session_id = out["container"], out["session_id"]
    assert "Time limit: 5s (the session ends at " in proc.stderr
    assert len(timers(name)) == 1  # a host process keeps the time; nobody is attached
    gone(incus, name, timeout=120)
    assert time.monotonic() - started >= 5
    info = user.run(["info", session_id], cwd=workspace)
    assert info.returncode == 0, info.stderr
    assert "Container exists: no" in info.stdout
    assert "Limits: max_duration=5s" in info.stdout
    assert "Ended: max_duration of 5s reached at " in info.stdout
    wait_for(lambda: not timers(name), timeout=10, what=f"the timer of {name} to end")
    assert not (user.home / ".coi" / "timers" / f"{name}.json").exists()


def test_an_attached_person_sees_the_end_coming_and_coi_shell_returns(limited, workspace, incus):
    user, _ = limited
    term = Terminal(user.argv(["coi", "shell", "--max-duration", "15s"], env={"TERM": "xterm-256color"}),
                    cwd=str(workspace))
    term.wait_for("fake-claude> ")
    name = next(line.split(": ", 1)[1].strip() for line in term.output().splitlines()
                if line.startswith("Container: "))
    term.wait_for("coi: this session reached its max_duration of 15s", timeout=60)  # in tmux
    term.wait_for(f"Session {name} reached its max_duration of 15s: coi stops and saves it", timeout=90)
    assert term.finish(timeout=90) == 0
    gone(incus, name, timeout=120)
    saved = list((user.home / ".coi" / "sessions-claude").glob("*/metadata.json"))
    assert [json.loads(p.read_text())["ended_by"] for p in saved] == ["max_duration"]
    assert not list((user.home / ".coi" / "sessions-claude").glob("*/generations/*"))  # saved once, by the timer


def test_a_persistent_session_is_stopped_kept_and_gets_a_new_clock_when_started_again(limited, workspace, incus):
    user, _ = limited
    first = user.background(workspace, "--debug", "--persistent", "--max-duration", "5s")
    name = first["container"]
    wait_for(lambda: incus.instance(name)["status"] == "Stopped" and not timers(name), timeout=120,
             what=f"{name} to be stopped by its timer")
    info = user.run(["info", first["session_id"]], cwd=workspace)
    assert "Container exists: yes" in info.stdout and "Ended: max_duration of 5s" in info.stdout
    # Started again by coi: a new clock (here a long one), the container no longer marked as ended.
    again = user.background(workspace, "--debug", "--persistent", "--max-duration", "10m")
    assert again["container"] == name and len(timers(name)) == 1
    cfg = incus.instance(name)["config"]
    assert cfg["user.coi.max_duration"] == "10m" and cfg.get("user.coi.ended_by", "") == ""
    assert user.run(["kill", name], cwd=workspace).returncode == 0
    wait_for(lambda: not timers(name), timeout=10, what=f"the timer of {name} to end")


def test_list_shows_the_limits_and_kill_ends_the_timer_at_once(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "10m"\ndisk = "4GiB"\n')
    name = user.background(workspace, "--debug")["container"]
    listed = json.loads(user.run(["list", "--format", "json"], cwd=workspace).stdout)["active_containers"]
    (mine,) = [c for c in listed if c["name"] == name]
    assert mine["limits"] == {"disk": "4GiB", "max_duration": "10m"}
    ends = calendar.timegm(time.strptime(mine["ends_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert 9 * 60 < ends - time.time() <= 10 * 60
    text = user.run(["list"], cwd=workspace).stdout
    assert "Limits: disk=4GiB, max_duration=10m" in text and f"Ends: {mine['ends_at']}" in text
    assert user.run(["kill", name], cwd=workspace).returncode == 0
    assert not timers(name)  # coi kill stops it before it returns
    assert not (user.home / ".coi" / "timers" / f"{name}.json").exists()


def test_clean_removes_the_timer_of_a_container_deleted_behind_cois_back(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "10m"\n')
    name = user.background(workspace, "--debug")["container"]
    (pid,) = timers(name)
    os.kill(pid, signal.SIGSTOP)  # so that it cannot notice by itself first: coi clean must do it
    incus.stop(name, force=True)
    incus.delete(name)
    proc = user.run(["clean", "--force"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert f"Removed the session timer of {name}" in proc.stdout + proc.stderr
    assert not timers(name) and not (user.home / ".coi" / "timers" / f"{name}.json").exists()


def test_a_timer_that_died_is_started_again_by_coi_list_with_the_same_deadline(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "10m"\n')
    name = user.background(workspace, "--debug")["container"]
    (pid,) = timers(name)
    deadline = incus.instance(name)["config"]["user.coi.deadline"]
    os.killpg(pid, signal.SIGKILL)  # a crash, or the OOM killer
    wait_for(lambda: not timers(name), timeout=10, what=f"the timer of {name} to be gone")
    proc = user.run(["list"], cwd=workspace)
    assert f"the session timer of {name} had ended; started it again" in proc.stderr
    (again,) = timers(name)
    assert again != pid and incus.instance(name)["config"]["user.coi.deadline"] == deadline
    assert user.run(["kill", name], cwd=workspace).returncode == 0
    assert not timers(name)


@pytest.mark.parametrize("args, config, message", [
    (["--max-duration", "2x"], "", "argument --max-duration: '2x' is not a duration"),
    (["--max-duration", "1s"], "", "argument --max-duration: '1s' is shorter than 5 seconds"),
    ([], 'max_duration = "forever"\n', "is not a duration"),
    ([], 'disk = "20"\n', "limits.disk = '20' is not a disk size"),
])
def test_bad_limits_exit_2_before_anything_is_created(limited, workspace, incus, args, config, message):
    user, limits = limited
    limits(config)
    proc = user.run(["shell", "--background", "--debug", *args], cwd=workspace)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert [i["name"] for i in incus.instances()
            if i["config"].get("user.coi.workspace") == str(workspace)] == []
    assert not timers(prefix=True)
