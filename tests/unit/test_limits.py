"""``[limits] max_duration`` and ``[limits] disk``: their grammar, the config keys, what a
session asks of Incus (the sized root disk, the marks of its time limit), how coi shows
them, and the session timer (``coi.sessions.timer``) on a clock of the test's own, against
the shared FakeIncus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coi.config import default_config, load_config
from coi.config.limits import format_duration, parse_disk, parse_duration, workspace_refusal
from coi.errors import CoiError, NotFoundError, UsageError
from coi.sessions import lifecycle, manage, spec, timer
from coi.sessions.lifecycle import Place
from fake_incus import DEFAULT, FakeIncus
from session_doubles import Said, home  # noqa: F401 (a fixture)

pytestmark = pytest.mark.unit


# ---- the grammar ---------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("2h", 7200), ("90m", 5400), ("30s", 30), ("1h30m", 5400), ("1d", 86400), ("1d2h3m4s", 93784),
    (" 45m ", 2700), ("5s", 5), ("365d", 365 * 86400), ("", 0), ("0", 0),
])
def test_durations_that_are_understood(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("2", "is not a duration"), ("2 h", "is not a duration"), ("2H", "is not a duration"),
    ("1.5h", "is not a duration"), ("-1h", "is not a duration"), ("30m1h", "is not a duration"),
    ("1h1h", "is not a duration"), ("two hours", "is not a duration"), ("0s", "shorter than 5 seconds"),
    ("4s", "shorter than 5 seconds"), ("366d", "longer than 365 days"), ("1h\n", "is not a duration"),
    (7200, "is not a duration"), (True, "is not a duration"),
])
def test_junk_durations_are_refused_with_the_grammar_in_the_hint(text, message):
    if isinstance(text, str) and text.endswith("\n"):
        text = text + "x"
    with pytest.raises(UsageError, match=message) as exc:
        parse_duration(text)
    assert exc.value.message.startswith("limits.max_duration = ")
    assert exc.value.hint and ("90m" in exc.value.hint or "5s" in exc.value.hint or "365d" in exc.value.hint)


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (90 * 60, "1h30m"), (86400 + 61, "1d1m1s"), (0, "0s")])
def test_durations_are_written_largest_units_first(seconds, text):
    assert format_duration(seconds) == text
    assert not seconds or parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("20GiB", 20 << 30), ("500GB", 500 * 10**9), ("512MiB", 512 << 20), ("1TiB", 1 << 40), ("", 0),
])
def test_disk_sizes_that_are_understood(text, size):
    assert parse_disk(text) == size


@pytest.mark.parametrize("text, message", [
    ("20", "is not a disk size"), ("20G", "is not a disk size"), ("1.5GiB", "is not a disk size"),
    ("20gib", "is not a disk size"), ("50%", "is not a disk size"), ("-1GiB", "is not a disk size"),
    ("100MiB", "smaller than 512MiB"), (20, "is not a disk size"),
])
def test_junk_disk_sizes_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_disk(text)


@pytest.mark.parametrize("key, value, base, allowed", [
    ("limits.max_duration", "1h", "2h", True),
    ("limits.max_duration", "2h", "2h", True),
    ("limits.max_duration", "3h", "2h", False),
    ("limits.max_duration", "0", "2h", False),  # "0" lifts the limit
    ("limits.max_duration", "", "2h", False),
    ("limits.max_duration", "1h", "", True),  # no limit of the user's: any limit is stricter
    ("limits.max_duration", "junk", "", False),
    ("limits.disk", "10GiB", "20GiB", True),
    ("limits.disk", "30GiB", "20GiB", False),
    ("limits.disk", "", "20GiB", False),
    ("limits.disk", "21GB", "20GiB", True),  # 21e9 bytes < 20 GiB
    ("limits.disk", "22GB", "20GiB", False),
])
def test_a_project_may_only_make_limits_stricter(key, value, base, allowed):
    assert (workspace_refusal(key, value, base) is None) is allowed


# ---- the config keys ----------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_limits_keys_and_profiles_load(tmp_path):
    user = write(tmp_path / "user.toml", '[limits]\nmax_duration = "2h"\ndisk = "20GiB"\n'
                                         '[profiles.short]\nlimits = { max_duration = "10m", disk = "8GiB" }\n')
    loaded = load_config(workspace=None, env={"HOME": str(tmp_path)}, system_file=tmp_path / "none",
                         user_file=user)
    assert (loaded.config.limits.max_duration, loaded.config.limits.disk) == ("2h", "20GiB")
    assert loaded.config.profiles["short"].limits.max_duration == "10m"
    chosen = load_config(workspace=None, env={"HOME": str(tmp_path)}, system_file=tmp_path / "none",
                         user_file=user, flags={"defaults.profile": ("--profile", "short")})
    assert (chosen.config.limits.max_duration, chosen.config.limits.disk) == ("10m", "8GiB")
    flagged = load_config(workspace=None, env={"HOME": str(tmp_path)}, system_file=tmp_path / "none",
                          user_file=user, flags={"limits.max_duration": ("--max-duration", "30s")})
    assert flagged.config.limits.max_duration == "30s" and flagged.origins["limits.max_duration"] == "flag --max-duration"
    assert default_config(env={"HOME": str(tmp_path)}).limits.max_duration == ""


def test_the_shell_flag_is_a_config_value():
    from coi.cli.context import FLAG_KEYS, Context
    from coi.cli.parser import build_parser

    args = vars(build_parser("shell").parse_args(["shell", "--max-duration", "90m"]))
    assert FLAG_KEYS["max_duration"] == ("limits.max_duration", "--max-duration")
    ctx = Context.from_namespace(args)
    assert ctx.flag_values["limits.max_duration"] == ("--max-duration", "90m") and "max_duration" not in args
    help_text = build_parser("shell")._subparsers._group_actions[0].choices["shell"].format_help()
    assert "--max-duration D" in help_text and "while detached" in help_text
    from coi.cli.completion import command_table

    assert "--max-duration" in command_table(build_parser())["shell"]["flags"].split()


# ---- a session's request and container ------------------------------------------------------

@pytest.fixture
def workspace(tmp_path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


@pytest.fixture
def network(monkeypatch):
    from coi import network as net

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(net, "applies_before_start", lambda inst, policy, sessions_dir: True)
    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw: calls.append(("apply", name)) or "nft")
    monkeypatch.setattr(net, "remove", lambda name, **kw: calls.append(("remove", name)))
    monkeypatch.setattr(net, "pin_nic", lambda client, instances: None)
    return calls


@pytest.fixture
def spawned(monkeypatch):
    """The timer's process, stood in for by a harmless sleeper that has its argv (so that
    coi can find and stop it); every one is killed afterwards."""
    procs: list[subprocess.Popen] = []

    def start(store, container, *, sessions_dir, client):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m", timer.TIMER_MODULE,
                                 container, str(sessions_dir)], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return proc.pid
    monkeypatch.setattr(timer, "_start", start)
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def limited(home: Path, *, max_duration: str = "", disk: str = "", **changes):
    cfg = default_config(env={"HOME": str(home)})
    return replace(cfg, limits=replace(cfg.limits, max_duration=max_duration, disk=disk), **changes)


def place_for(home: Path, workspace: Path, fake: FakeIncus, **limits) -> Place:
    state = home / ".coi"
    return Place(client=fake, config=limited(home, **limits), workspace=workspace, messages=Said(),
                 state_dir=lambda: state.mkdir(mode=0o700, exist_ok=True) or state)


def request(place: Place, **kw):
    args = dict(slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None)
    args.update(kw)
    return lifecycle.request(place, **args)


def coi_profile(fake: FakeIncus, driver: str = "btrfs") -> None:
    fake.create_profile("coi", config={}, devices={"root": {"type": "disk", "path": "/", "pool": "coi"},
                                                   "eth0": {"type": "nic", "network": "coibr0"}})
    fake.create_storage_pool("coi", driver, {})
    fake.calls.clear()


@pytest.mark.parametrize("limits, message", [
    ({"max_duration": "2 hours"}, "limits.max_duration = '2 hours' is not a duration"),
    ({"max_duration": "1s"}, "shorter than 5 seconds"),
    ({"disk": "20"}, "limits.disk = '20' is not a disk size"),
    ({"disk": "1MiB"}, "smaller than 512MiB"),
])
def test_bad_limits_are_refused_before_anything_exists(home, workspace, limits, message):
    fake = FakeIncus()
    with pytest.raises(UsageError, match=message):
        request(place_for(home, workspace, fake, **limits))
    assert fake.called("create_instance") == []


def test_a_disk_limit_sizes_the_profiles_root_disk_in_the_containers_own_devices(home, workspace, network):
    fake = FakeIncus()
    coi_profile(fake)
    place = place_for(home, workspace, fake, disk="20GiB")
    req = request(place)
    assert req.disk == "20GiB"
    session = lifecycle.open_session(place, req)
    (create,) = fake.called("create_instance")
    assert create.kwargs["devices"]["root"] == {"type": "disk", "path": "/", "pool": "coi", "size": "20GiB"}
    assert create.kwargs["profiles"] == ["coi"]  # the profile's other devices stay the profile's
    assert spec.to_info(fake.instance(session.name)).limits == {"disk": "20GiB"}
    assert not [t for kind, t in place.messages.lines if kind == "warn" or "may not" in t]


def test_no_disk_limit_leaves_the_root_disk_to_the_profile(home, workspace, network):
    fake = FakeIncus()
    coi_profile(fake)
    place = place_for(home, workspace, fake)
    lifecycle.open_session(place, request(place))
    assert "root" not in fake.called("create_instance")[0].kwargs["devices"]
    assert fake.called("profile") == []


@pytest.mark.parametrize("profiles", [{}, {"coi": {}}, {"coi": {"root": {"type": "disk", "path": "/"}}}])
def test_a_disk_limit_without_a_root_disk_in_the_profile_is_refused_before_the_container(
        home, workspace, network, profiles):
    fake = FakeIncus()
    for name, devices in profiles.items():
        fake.create_profile(name, config={}, devices=devices)
    place = place_for(home, workspace, fake, disk="20GiB")
    with pytest.raises(CoiError, match="no root disk") as exc:
        lifecycle.open_session(place, request(place))
    assert "coi setup" in exc.value.hint and fake.called("create_instance") == []


def test_a_pool_that_may_not_enforce_the_size_is_named(home, workspace, network):
    fake = FakeIncus()
    coi_profile(fake, driver="dir")
    place = place_for(home, workspace, fake, disk="20GiB")
    lifecycle.open_session(place, request(place))
    assert any("storage pool coi (dir) may not hold" in text for _, text in place.messages.lines)


def test_limits_are_shown_in_list_json_and_text():
    from coi.cli.render import render_sessions

    inst = {"name": "coi-test-abc-1", "status": "Running", "created_at": "t",
            "config": {"limits.cpu": "2", "user.coi.workspace": "/w", spec.MAX_DURATION_KEY: "2h",
                       spec.DEADLINE_KEY: "2026-12-01T12:00:00Z"},
            "devices": {}, "expanded_devices": {"root": {"type": "disk", "pool": "coi", "path": "/", "size": "20GiB"}}}
    info = spec.to_info(inst)
    assert info.limits == {"cpu": "2", "disk": "20GiB", "max_duration": "2h"}
    data = info.to_json()
    assert data["limits"] == {"cpu": "2", "disk": "20GiB", "max_duration": "2h"}
    assert data["ends_at"] == "2026-12-01T12:00:00Z"
    stopped = spec.to_info({**inst, "status": "Stopped"})
    assert stopped.ends_at is None and stopped.limits["max_duration"] == "2h"
    out: list[str] = []

    class UI:
        def out(self, text: str) -> None:
            out.append(text)
    render_sessions(UI(), [info], [], format="text", include_saved=False)
    assert "    Limits: cpu=2, disk=20GiB, max_duration=2h" in out
    assert "    Ends: 2026-12-01T12:00:00Z ([limits] max_duration)" in out
    cleared = spec.to_info({**inst, "config": {**inst["config"], spec.MAX_DURATION_KEY: "", spec.DEADLINE_KEY: ""}})
    assert "max_duration" not in cleared.limits and cleared.ends_at is None


# ---- what the timer does next (a table, no clock) ---------------------------------------------

D = 1000.0  # the deadline


@pytest.mark.parametrize("now, status, seen, waited, warn_at, step", [
    (0, "Running", True, 0, None, timer.Step("wait", timer.CHECK_SECONDS)),
    (D - 3, "Running", True, 900, None, timer.Step("wait", 3)),
    (D, "Running", True, 900, None, timer.Step("expire")),
    (D + 50, "Running", True, 900, None, timer.Step("expire")),  # woken late (a suspended host)
    (D, "Stopped", True, 900, None, timer.Step("expire")),  # powered off or rebooting: the deadline holds
    (500, "Stopped", True, 400, None, timer.Step("wait", timer.CHECK_SECONDS)),  # a reboot, however slow
    (500, None, True, 400, None, timer.Step("gone")),
    (5, "Stopped", False, 5, None, timer.Step("wait", timer.CHECK_SECONDS)),  # still being started by coi
    (D + 1, "Stopped", False, 30, None, timer.Step("wait", timer.CHECK_SECONDS)),  # not ended before it ran
    (55, "Stopped", False, timer.START_GRACE - 5, None, timer.Step("wait", 5)),
    (90, "Stopped", False, timer.START_GRACE, None, timer.Step("unstarted")),
    (5, "Running", False, 5, None, timer.Step("wait", timer.CHECK_SECONDS)),  # seen running just now
    (D - 400, "Running", True, 500, D - 300, timer.Step("wait", timer.CHECK_SECONDS)),
    (D - 305, "Running", True, 500, D - 300, timer.Step("wait", 5)),
    (D - 300, "Running", True, 500, D - 300, timer.Step("warn")),
    (D - 300, "Stopped", True, 500, D - 300, timer.Step("wait", timer.CHECK_SECONDS)),  # no one to tell
    (500, "Unknown", True, 400, None, timer.Step("wait", timer.CHECK_SECONDS)),  # Incus did not answer
])
def test_the_timers_next_step(now, status, seen, waited, warn_at, step):
    assert timer.next_step(now=now, deadline=D, warn_at=warn_at, status=status, seen_running=seen,
                           waited=waited) == step


def test_the_heads_up_comes_only_for_long_enough_limits():
    assert timer.warn_time(D, 600) == D - timer.WARN_BEFORE
    assert timer.warn_time(D, 599) is None


# ---- the timer on a fake clock --------------------------------------------------------------

class Clock:
    """The test's clock: ``wait`` moves it on (and runs what is due then), never sleeps."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.waits: list[float] = []
        self.at: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        assert 0 < seconds <= timer.CHECK_SECONDS
        self.waits.append(seconds)
        self.now += seconds
        for when, action in [a for a in self.at if a[0] <= self.now]:
            self.at.remove((when, action))
            action()
        assert len(self.waits) < 10_000, "the timer does not come to an end"
        return False


def running_session(home, workspace, network, *, persistent: bool = False, **limits):
    fake = FakeIncus()
    coi_profile(fake)
    place = place_for(home, workspace, fake, **limits)
    req = request(place, persistent=persistent)
    session = lifecycle.open_session(place, req)
    fake.start(session.name)
    return fake, place, session


def timer_for(place: Place, name: str, clock: Clock, *, seconds: int, max_duration: str,
              notified: list[str] | None = None) -> timer.Timer:
    record = {"deadline": clock() + seconds, "seconds": seconds, "max_duration": max_duration}
    timer.TimerStore(place.sessions_dir).save(name, {**record, "container": name})
    return timer.Timer(place, name, record, notify=(notified if notified is not None else []).append,
                       clock=clock, wait=clock.wait, log=lambda text: None)


def test_at_the_deadline_the_session_is_stopped_saved_and_deleted(home, workspace, network):
    fake, place, session = running_session(home, workspace, network)
    clock, notified = Clock(), []
    started = clock()
    t = timer_for(place, session.name, clock, seconds=7200, max_duration="2h", notified=notified)
    assert t.run() == 0
    assert clock() - started == pytest.approx(7200) and max(clock.waits) <= timer.CHECK_SECONDS
    assert len(clock.waits) == pytest.approx(7200 / timer.CHECK_SECONDS, abs=2)  # woken only to look
    assert notified[0].startswith("coi: this session ends in 5m") and "max_duration of 2h" in notified[-1]
    stops = fake.called("stop")
    assert stops and stops[0].kwargs == {"timeout": timer.STOP_TIMEOUT}  # graceful first
    assert not fake.exists(session.name) and ("remove", session.name) in network
    saved = json.loads((home / ".coi" / "sessions-claude" / session.session_id / "metadata.json").read_text())
    assert saved["ended_by"] == "max_duration" and saved["max_duration"] == "2h"
    assert saved["ended_at"] == timer.iso(clock())
    assert not timer.TimerStore(place.sessions_dir).record_path(session.name).exists()


def test_a_persistent_container_is_stopped_and_kept_and_marked(home, workspace, network):
    fake, place, session = running_session(home, workspace, network, persistent=True)
    clock = Clock()
    timer_for(place, session.name, clock, seconds=30, max_duration="30s").run()
    inst = fake.instance(session.name)
    assert inst["status"] == "Stopped" and inst["config"][spec.ENDED_KEY] == "max_duration"
    assert timer.ended_by_limit(inst) == "?"  # (this test armed no marks but the end's)


def test_the_timer_ends_when_the_container_goes_earlier(home, workspace, network):
    fake, place, session = running_session(home, workspace, network)
    clock = Clock()
    t = timer_for(place, session.name, clock, seconds=3600, max_duration="1h")
    start = clock()
    clock.at.append((start + 100, lambda: (fake.stop(session.name), fake.delete(session.name))))
    assert t.run() == 0
    assert clock() - start <= 100 + timer.CHECK_SECONDS
    assert fake.called("update_instance") == [] and not timer.TimerStore(place.sessions_dir).names()


def test_a_reboot_from_inside_keeps_the_clock(home, workspace, network):
    fake, place, session = running_session(home, workspace, network)
    clock = Clock()
    start = clock()
    t = timer_for(place, session.name, clock, seconds=600, max_duration="10m")
    clock.at.append((start + 95, lambda: fake.stop(session.name)))
    clock.at.append((start + 300, lambda: fake.start(session.name)))  # a slow one: still the same clock
    t.run()
    assert clock() - start == pytest.approx(600) and not fake.exists(session.name)


def test_a_session_powered_off_while_detached_is_saved_and_removed_at_its_deadline(home, workspace, network):
    fake, place, session = running_session(home, workspace, network)
    clock = Clock()
    start = clock()
    t = timer_for(place, session.name, clock, seconds=600, max_duration="10m")
    clock.at.append((start + 95, lambda: fake.stop(session.name)))  # sudo poweroff, nobody attached
    t.run()
    assert clock() - start == pytest.approx(600)
    assert not fake.exists(session.name) and fake.called("stop")[-1].kwargs == {}  # (the poweroff's)
    assert (home / ".coi" / "sessions-claude" / session.session_id / "metadata.json").exists()


def test_a_container_that_never_started_is_not_ended_by_the_timer(home, workspace, network):
    fake = FakeIncus()
    place = place_for(home, workspace, fake)
    session = lifecycle.open_session(place, request(place))  # created, stopped: coi is still starting it
    clock = Clock()
    start = clock()
    timer_for(place, session.name, clock, seconds=5, max_duration="5s").run()
    assert clock() - start >= timer.START_GRACE and fake.called("stop") == [] and fake.exists(session.name)


def test_a_failing_shutdown_still_forces_the_stop(home, workspace, network):
    fake, place, session = running_session(home, workspace, network, persistent=True)
    attempts = []

    def stubborn(name, *, force=False, timeout=-1):
        attempts.append(force)
        if len(attempts) < 3:
            raise CoiError("the container did not stop")
        return DEFAULT
    fake.on("stop", stubborn)
    timer_for(place, session.name, Clock(), seconds=5, max_duration="5s").run()
    assert attempts == [False, True, True] and fake.instance(session.name)["status"] == "Stopped"


def test_an_end_that_fails_is_tried_again_until_incus_answers(home, workspace, network):
    from coi.errors import DaemonUnavailableError

    fake, place, session = running_session(home, workspace, network)
    failures = [3]

    def restarting(name, **kw):
        if failures[0]:
            failures[0] -= 1
            raise DaemonUnavailableError("Incus is restarting")
        return DEFAULT
    fake.on("update_instance", restarting)
    clock, notified = Clock(), []
    t = timer_for(place, session.name, clock, seconds=5, max_duration="5s", notified=notified)
    assert t.run() == 0
    assert t.tries == 4 and len(notified) == 1  # told once
    assert not fake.exists(session.name)
    assert (home / ".coi" / "sessions-claude" / session.session_id / "metadata.json").exists()


def test_an_end_that_keeps_failing_is_given_up_and_said(home, workspace, network):
    from coi.errors import DaemonUnavailableError

    fake, place, session = running_session(home, workspace, network)

    def down(name, **kw):
        raise DaemonUnavailableError("Incus is down")
    fake.on("update_instance", down)
    fake.on("stop", down)
    logged: list[str] = []
    clock = Clock()
    record = {"deadline": clock() + 5, "seconds": 5, "max_duration": "5s"}
    timer.TimerStore(place.sessions_dir).save(session.name, {**record, "container": session.name})
    t = timer.Timer(place, session.name, record, notify=lambda text: None, clock=clock, wait=clock.wait,
                    log=logged.append)
    assert t.run() == 0 and t.tries == timer.END_TRIES
    assert "giving up" in logged[-1] and "coi shutdown" in logged[-1]
    assert not timer.TimerStore(place.sessions_dir).names()


def test_a_hanging_message_into_the_container_does_not_hold_up_the_end(home, workspace, network, monkeypatch):
    """The agent swapped tmux for something that never returns: the message gets its few
    seconds (here 0.2), then the timer goes on."""
    fake, place, session = running_session(home, workspace, network)
    monkeypatch.setattr(timer, "NOTIFY_TIMEOUT", 0.2)
    fake.on("exec_argv", lambda name, command, **kw: [sys.executable, "-c", "import time; time.sleep(30)"])
    logged: list[str] = []
    notify = timer.tmux_notify(fake, session.name, code_uid=1000, log=logged.append)
    started = time.monotonic()
    notify("coi: this session reached its max_duration")
    assert time.monotonic() - started < 5 and "took longer" in logged[0]
    (argv,) = [c[2] for c in fake.called("exec_argv")]
    assert argv[:3] == ["setpriv", "--reuid=1000", "--regid=1000"]
    assert argv[-1] == "coi: this session reached its max_duration"  # an argument, not shell text


# ---- arming, stopping, cleaning ----------------------------------------------------------------

def test_arm_starts_a_timer_marks_the_container_and_keeps_a_running_clock(home, workspace, network, spawned):
    fake, place, session = running_session(home, workspace, network)
    deadline = timer.arm(place, session.name, max_duration="2h", seconds=7200, session_id=session.session_id,
                         fresh=True, clock=lambda: 1000.0)
    assert deadline == 8200.0
    record = timer.TimerStore(place.sessions_dir).record(session.name)
    assert record["pid"] == spawned[0].pid and record["deadline"] == 8200.0 and record["max_duration"] == "2h"
    cfg = fake.instance(session.name)["config"]
    assert (cfg[spec.MAX_DURATION_KEY], cfg[spec.DEADLINE_KEY], cfg[spec.ENDED_KEY]) == \
        ("2h", "1970-01-01T02:16:40Z", "")
    # The session goes on (coi attach, coi shell on a running container): the same clock.
    assert timer.arm(place, session.name, max_duration="1h", seconds=3600, session_id=session.session_id,
                     fresh=False, clock=lambda: 5000.0) == 8200.0
    assert len(spawned) == 1
    # coi starts the container anew: a new clock, the old timer gone.
    assert timer.arm(place, session.name, max_duration="1h", seconds=3600, session_id=session.session_id,
                     fresh=True, clock=lambda: 5000.0) == 8600.0
    assert spawned[0].wait(timeout=5) is not None and spawned[1].poll() is None
    # A timer that died under the running session: started again, on the same clock.
    spawned[1].kill()
    spawned[1].wait()
    assert timer.arm(place, session.name, max_duration="1h", seconds=3600, session_id=session.session_id,
                     fresh=False, clock=lambda: 9000.0) == 8600.0
    assert len(spawned) == 3 and spawned[2].poll() is None
    timer.disarm(place, session.name)
    assert spawned[2].wait(timeout=5) is not None
    assert not timer.TimerStore(place.sessions_dir).names()


def test_a_timer_that_ended_under_a_running_session_is_started_again_on_its_own_record(
        home, workspace, network, spawned):
    fake, place, session = running_session(home, workspace, network)
    deadline = timer.arm(place, session.name, max_duration="2h", seconds=7200, session_id="s", fresh=True)
    assert timer.revive(place.sessions_dir, fake, [session.name]) == []  # it runs: nothing to do
    spawned[0].kill()
    spawned[0].wait()
    assert timer.revive(place.sessions_dir, fake, [session.name, "coi-test-other-1", "../x"]) == [session.name]
    record = timer.TimerStore(place.sessions_dir).record(session.name)
    assert record["pid"] == spawned[1].pid and record["deadline"] == deadline  # the same deadline


def test_a_timer_that_cannot_start_refuses_the_session(home, workspace, network, monkeypatch):
    fake, place, session = running_session(home, workspace, network)

    def no_fork(*a, **kw):
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(timer, "_start", no_fork)
    with pytest.raises(CoiError, match="did not start"):
        timer.arm(place, session.name, max_duration="2h", seconds=7200, session_id="s", fresh=True)
    assert not timer.TimerStore(place.sessions_dir).names()
    assert spec.MAX_DURATION_KEY not in fake.instance(session.name)["config"]


def test_clean_stops_the_timers_of_containers_that_went(home, workspace, network, spawned):
    fake, place, session = running_session(home, workspace, network)
    timer.arm(place, session.name, max_duration="2h", seconds=7200, session_id="s", fresh=True)
    gone = "coi-test-gone0000-1"
    timer.arm(place, session.name, max_duration="2h", seconds=7200, session_id="s", fresh=False)
    fake.create_instance(gone, start=True)
    timer.arm(place, gone, max_duration="2h", seconds=7200, session_id="s", fresh=True)
    store = timer.TimerStore(place.sessions_dir)
    store.record_path(gone).unlink()  # its record lost as well: found by its process
    fake.stop(gone)
    fake.delete(gone)
    existing = {i["name"] for i in fake.instances()}
    plan = manage.plan_clean(place, saved_sessions=False)
    assert plan.timers_removed == [gone] and existing == {session.name}
    assert spawned[1].wait(timeout=5) is not None and spawned[0].poll() is None
    assert store.names() == [session.name]


def test_timer_records_are_only_for_container_names():
    store = timer.TimerStore(Path("/nonexistent"))
    for bad in ("../x", "a/b", "", "-x", "x" * 64):
        with pytest.raises(CoiError):
            store.record_path(bad)


# ---- a session with a time limit, start to end --------------------------------------------------

def test_a_limited_session_arms_its_timer_before_the_container_starts(home, workspace, network, spawned):
    fake = FakeIncus()
    place = place_for(home, workspace, fake, max_duration="90m")
    req = request(place)
    assert (req.max_duration, req.max_seconds) == ("90m", 5400)
    session = lifecycle.open_session(place, req)
    lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    order = [c[0] for c in fake.calls if c[0] in ("update_instance", "start")]
    assert order.index("update_instance") < order.index("start")
    assert any(t.startswith("Time limit: 90m (the session ends at ") for _, t in place.messages.lines)
    assert len(spawned) == 1
    lifecycle.end(place, session.name)
    assert spawned[0].wait(timeout=5) is not None and not timer.TimerStore(place.sessions_dir).names()
    saved = json.loads((home / ".coi" / "sessions-claude" / session.session_id / "metadata.json").read_text())
    assert saved["limits"]["max_duration"] == "90m" and "ended_by" not in saved


def test_a_failed_start_takes_its_timer_along(home, workspace, network, spawned):
    fake = FakeIncus()
    place = place_for(home, workspace, fake, max_duration="90m")
    req = request(place)
    session = lifecycle.open_session(place, req)

    def broken(name, command, **kw):
        if "new-session" in command:
            raise CoiError("the agent does not start")
        return DEFAULT
    fake.on("exec", broken)
    with pytest.raises(CoiError):
        lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    assert spawned[0].wait(timeout=5) is not None and not timer.TimerStore(place.sessions_dir).names()


def test_a_persistent_container_started_again_gets_a_new_clock_and_a_running_one_keeps_it(
        home, workspace, network, spawned):
    fake = FakeIncus()
    place = place_for(home, workspace, fake, max_duration="90m")
    req = request(place, persistent=True)
    session = lifecycle.open_session(place, req)
    lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    again = lifecycle.open_session(place, req)  # coi shell --persistent while it runs
    lifecycle.start(place, again, req, None, debug=False, tmux_session=True)
    assert len(spawned) == 1 and spawned[0].poll() is None
    manage.shutdown(place, fake.instance(session.name), timeout=5)
    assert spawned[0].wait(timeout=5) is not None
    restarted = lifecycle.open_session(place, req)
    lifecycle.start(place, restarted, req, None, debug=False, tmux_session=True)
    assert len(spawned) == 2 and spawned[1].poll() is None
    # Without a limit now, the next start takes the marks of the old one off.
    manage.shutdown(place, fake.instance(session.name), timeout=5)
    place = place_for(home, workspace, fake)
    req = request(place, persistent=True)
    lifecycle.start(place, lifecycle.open_session(place, req), req, None, debug=False, tmux_session=True)
    cfg = fake.instance(session.name)["config"]
    assert cfg[spec.MAX_DURATION_KEY] == cfg[spec.DEADLINE_KEY] == cfg[spec.ENDED_KEY] == ""
    assert len(spawned) == 2


def test_an_attached_coi_leaves_the_end_to_the_timer(home, workspace, network):
    fake, place, session = running_session(home, workspace, network, persistent=True)
    fake.update_instance(session.name, config={spec.MAX_DURATION_KEY: "2h", spec.ENDED_KEY: "max_duration"})
    fake.stop(session.name)
    lifecycle.after_attach(place, session.name, 1)
    assert not (home / ".coi" / "sessions-claude").exists()  # no second save
    assert any("reached its max_duration of 2h" in t for _, t in place.messages.lines)


def test_info_shows_the_limits_and_why_the_session_ended(home, workspace, network, capsys, monkeypatch):
    from coi.cli.commands import sessions as cmd
    from coi.cli.context import Context
    from coi.cli.ui import UI

    fake, place, session = running_session(home, workspace, network, disk="20GiB")
    fake.update_instance(session.name, config={spec.MAX_DURATION_KEY: "5s"})
    lifecycle.end(place, session.name, note={"ended_by": "max_duration", "max_duration": "5s",
                                             "ended_at": "2026-12-01T12:00:00Z"})
    ctx = Context(ui=UI(), workspace=workspace, flag_values={})
    ctx.__dict__["incus"] = fake
    monkeypatch.setattr(Context, "config", property(lambda self: place.config))
    monkeypatch.setattr(Context, "loaded_config", property(lambda self: None))
    ctx.__dict__["sessions_dir"] = place.sessions_dir
    assert cmd.info(ctx) == 0
    out = capsys.readouterr().out
    assert "Limits: disk=20GiB, max_duration=5s" in out
    assert "Ended: max_duration of 5s reached at 2026-12-01T12:00:00Z" in out


def test_the_state_directory_guards_the_timers_too():
    from coi.statedir import SUBDIRS

    assert "timers" in SUBDIRS


def test_the_timer_process_ends_a_session_from_its_record_and_the_users_own_config(
        home, workspace, network, monkeypatch):
    """``main`` as the detached process runs it, on its own record and a client of its own
    (the fake here), with a deadline a moment away on the real clock."""
    from coi.incus import Incus

    fake, place, session = running_session(home, workspace, network)
    monkeypatch.setattr(Incus, "from_environment", classmethod(lambda cls, project="default": fake))
    monkeypatch.chdir(workspace)
    store = timer.TimerStore(place.sessions_dir)
    store.save(session.name, {"container": session.name, "deadline": time.time() + 0.2, "seconds": 5,
                              "max_duration": "5s", "project": "default", "workspace": str(workspace)})
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        assert timer.main([session.name, str(place.sessions_dir)]) == 0
        assert os.getcwd() == "/"  # holds no workspace busy
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert not fake.exists(session.name) and not store.names()
    saved = json.loads((home / ".coi" / "sessions-claude" / session.session_id / "metadata.json").read_text())
    assert saved["ended_by"] == "max_duration"
    assert [c for c in fake.called("exec_argv") if "display-message" in " ".join(c[2])]


def test_the_timer_process_without_a_record_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    assert timer.main(["coi-test-none-1", str(state)]) == 0
    assert timer.main(["only-one-argument"]) == 2
    with pytest.raises(CoiError):
        timer.main(["../escape", str(state)])


def test_the_timer_runs_isolated_python_from_its_module():
    argv = timer.timer_argv("coi-test-abc-1", Path("/home/u/.coi"))
    assert argv[1:] == ["-I", "-m", "coi.sessions.timer", "coi-test-abc-1", "/home/u/.coi"]
    assert "PYTHONPATH" not in timer.TIMER_ENV and "PATH" not in timer.TIMER_ENV
