"""The two attackers against ``[limits] max_duration`` and ``[limits] disk``.

The project (its .coi.toml, a profile it writes or picks) may only make the limits
stricter: never longer, larger, or lifted. The agent, root in its container, cannot
stop, pause or extend the session timer: it is a host process the container cannot see
or reach, it trusts nothing the container writes, and a message into the container
(tmux swapped for something that hangs) or a container that ignores the stop does not
hold up the end. The first part is pure logic; the second runs on the real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from coi.wait import wait_for

from conftest import TEST_PREFIX
from configfiles import ConfigFiles

TIMER = b"coi.sessions.timer"


# ---- the project: only stricter (no daemon) -------------------------------------------------

Files = ConfigFiles


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


USER = '[limits]\nmax_duration = "2h"\ndisk = "20GiB"\n'


@pytest.mark.unit
@pytest.mark.parametrize("project, key, kept", [
    ('[limits]\nmax_duration = "3h"', "limits.max_duration", "2h"),  # longer
    ('[limits]\nmax_duration = "0"', "limits.max_duration", "2h"),  # lifted
    ('[limits]\nmax_duration = ""', "limits.max_duration", "2h"),
    ('[limits]\nmax_duration = "2h1s"', "limits.max_duration", "2h"),
    ('[limits]\nmax_duration = "2 h"', "limits.max_duration", "2h"),  # junk does not pass either
    ('[limits]\ndisk = "40GiB"', "limits.disk", "20GiB"),
    ('[limits]\ndisk = ""', "limits.disk", "20GiB"),
    ('[limits]\ndisk = "22GB"', "limits.disk", "20GiB"),  # 22e9 > 20 GiB
    ('[profiles.p]\nimage = "coi"\nlimits = { max_duration = "9h" }\n[defaults]\nprofile = "p"',
     "limits.max_duration", "2h"),
    ('[profiles.p]\nimage = "coi"\nlimits = { disk = "1TiB" }\n[defaults]\nprofile = "p"', "limits.disk", "20GiB"),
])
def test_a_project_cannot_lengthen_enlarge_or_lift_the_users_limits(files, project, key, kept):
    loaded = files.load(project, USER)
    assert loaded.values[key] == kept
    assert any("ignored" in w and key in w for w in loaded.warnings), loaded.warnings


@pytest.mark.unit
def test_a_limit_of_the_wrong_type_is_a_clear_error_naming_the_file(files):
    from coi.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\.coi\.toml: limits\.max_duration = 99999 is not allowed"):
        files.load("[limits]\nmax_duration = 99999\n", USER)


@pytest.mark.unit
@pytest.mark.parametrize("project, key, value", [
    ('[limits]\nmax_duration = "30m"', "limits.max_duration", "30m"),
    ('[limits]\nmax_duration = "2h"', "limits.max_duration", "2h"),
    ('[limits]\ndisk = "10GiB"', "limits.disk", "10GiB"),
])
def test_a_project_may_shorten_or_lower_them(files, project, key, value):
    loaded = files.load(project, USER)
    assert loaded.values[key] == value and not loaded.warnings


@pytest.mark.unit
def test_a_project_cannot_pick_the_users_longer_profile(files):
    user = USER + '[profiles.long]\nlimits = { max_duration = "12h", disk = "100GiB" }\n'
    loaded = files.load('[defaults]\nprofile = "long"\n', user)
    assert (loaded.values["limits.max_duration"], loaded.values["limits.disk"]) == ("2h", "20GiB")
    chosen = files.load("", user, flags={"defaults.profile": ("--profile", "long")})
    assert chosen.values["limits.max_duration"] == "12h"  # the user's own choice is honoured


@pytest.mark.unit
def test_with_no_limit_of_the_users_own_a_project_may_set_one(files):
    loaded = files.load('[limits]\nmax_duration = "1h"\ndisk = "8GiB"\n', "")
    assert (loaded.values["limits.max_duration"], loaded.values["limits.disk"]) == ("1h", "8GiB")


# ---- the agent: the timer is out of its reach (real daemon) ------------------------------------

def processes() -> dict[int, list[bytes]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
    return found


def timers(name: str, *, prefix: bool = False) -> list[int]:
    """Session timer processes of container ``name`` (with ``prefix``: of every container
    whose name starts with it)."""
    found = []
    for pid, argv in processes().items():
        if TIMER in argv:
            container = (argv[argv.index(TIMER) + 1:] or [b""])[0].decode(errors="replace")
            if container == name or (prefix and container.startswith(name)):
                found.append(pid)
    return found


@pytest.fixture
def limited(session_user):
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()

    def limits(text: str) -> None:
        config.write_text(original + "\n[limits]\n" + text)
    yield session_user, limits
    config.write_text(original)
    for pid in timers(TEST_PREFIX, prefix=True):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


# What the agent tries, as root in its container: find and kill the timer, push its own
# deadline through Incus's guest API, swap tmux for something that never returns (the
# timer's message runs it), and make the container ignore its stop.
AGENT = r'''
import json, os, socket, subprocess
NEEDLE = "coi.sessions" + ".timer"  # split: this script's own command line must not match it
def run(*argv):
    try:
        return subprocess.run(list(argv), capture_output=True).returncode
    except OSError:
        return None
seen = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            seen.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
        except OSError:
            pass
run("pkill", "-9", "-f", NEEDLE)
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect("/dev/incus/sock")
    body = json.dumps({"config": {"user.coi.deadline": "2099-01-01T00:00:00Z", "user.coi.max_duration": ""}})
    s.sendall(f"PATCH /1.0 HTTP/1.0\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    patched = s.recv(4096).decode(errors="replace").split("\r\n")[0]
except OSError as exc:
    patched = f"no guest API: {exc}"
with open("/usr/bin/tmux.coi-test", "w") as fh:
    fh.write("#!/bin/sh\nexec sleep 3600\n")
os.chmod("/usr/bin/tmux.coi-test", 0o755)
os.replace("/usr/bin/tmux.coi-test", "/usr/bin/tmux")
run("systemctl", "mask", "sigpwr.target", "poweroff.target", "halt.target")
print(json.dumps({"timer_seen": [c for c in seen if NEEDLE in c], "patched": patched}))
'''


@pytest.mark.security
def test_the_agent_cannot_stop_or_extend_the_session_timer(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "20s"\n')
    out = user.background(workspace, "--debug")
    name, session_id = out["container"], out["session_id"]
    started = time.monotonic()
    (pid,) = timers(name)
    # A host process of the user's, outside the container's PID namespace, isolated Python.
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    assert os.stat(f"/proc/{pid}").st_uid == user.uid
    assert b"-I" in processes()[pid] and os.readlink(f"/proc/{pid}/cwd") == "/"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"PYTHON")], environ

    deadline = incus.instance(name)["config"]["user.coi.deadline"]
    result = incus.exec(name, ["python3", "-c", AGENT])
    assert result.exit_code == 0, result.stderr
    said = json.loads(result.stdout)
    assert said["timer_seen"] == []  # not even visible
    assert incus.instance(name)["config"]["user.coi.deadline"] == deadline, said["patched"]
    assert incus.instance(name)["config"]["user.coi.max_duration"] == "20s"
    assert timers(name) == [pid]  # pkill inside reached nothing

    # The end comes anyway: 20 s, the message's 5 s at most, the stop (forced after 30 s), the save.
    wait_for(lambda: not incus.exists(name), timeout=180, what=f"{name} to be ended by its timer")
    assert time.monotonic() - started < 150
    info = user.run(["info", session_id], cwd=workspace)
    assert "Ended: max_duration of 20s reached at " in info.stdout, info.stdout + info.stderr
    wait_for(lambda: not timers(name), timeout=10, what=f"the timer of {name} to end")


@pytest.mark.security
def test_a_projects_longer_limit_is_ignored_and_the_users_own_ends_the_session(limited, workspace, incus):
    user, limits = limited
    limits('max_duration = "5s"\n')
    (workspace / ".coi.toml").write_text('[limits]\nmax_duration = "1h"\n')
    os.chown(workspace / ".coi.toml", user.uid, user.gid)
    proc = user.run(["shell", "--background", "--debug", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert "ignored limits.max_duration" in proc.stderr and "Time limit: 5s" in proc.stderr
    name = json.loads(proc.stdout)["container"]
    wait_for(lambda: not incus.exists(name), timeout=120, what=f"{name} to be ended by its timer")
