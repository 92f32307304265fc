"""The session timer: ``[limits] max_duration`` enforced from the host.

The agent is root in its container and hostile, so nothing in there may keep the
time (a ``shutdown +N`` inside is cancelled with one command). Each limited session
gets a detached host process of its own instead, started by ``arm``
(``python -I -m coi.sessions.timer CONTAINER SESSIONS_DIR``, own session, cwd ``/``,
a minimal environment) that outlives ``coi shell --background``. It

* waits for the deadline (an event wait, woken early only to look at the container
  every ``CHECK_SECONDS``, never a busy loop), and shows a heads-up in the tmux
  session ``WARN_BEFORE`` the end of a long enough limit;
* at the deadline shows a line in the session's tmux, marks the container
  (``user.coi.ended_by``), then does what ``coi shutdown NAME`` does: a graceful stop
  (forced after ``STOP_TIMEOUT``), the session saved with ``ended_by`` in its
  metadata (``coi info`` shows it), the container deleted unless persistent;
* ends when the container goes away earlier, or never starts (coi removes a start
  that failed). A container that stops before its deadline (a reboot or a poweroff
  from inside) keeps its clock: a reboot, however slow, does not escape the limit,
  and a session powered off while nobody was attached is saved and removed at the
  deadline, as ``coi clean`` would.

What the timer acts on comes from its own record under ``<sessions_dir>/timers`` and
the user's own config, never from the container: what the agent can reach of the
instance (``user.*`` keys through Incus's guest API) it can read, not write, and the
timer does not read it. A message to the tmux session runs in the container, so it
gets ``NOTIFY_TIMEOUT`` and no more: an agent that swapped tmux for something that
hangs does not hold the stop up.

The clock belongs to one run of the container: a new start by coi (a new session, a
resume, a persistent container started again) starts a new clock; ``coi shell`` or
``coi attach`` on a container that runs keeps it. ``end`` and ``remove`` in
``lifecycle`` stop the timer; ``coi clean`` stops timers whose container is gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from coi import detached
from coi.errors import CoiError, NotFoundError
from coi.sessions.spec import DEADLINE_KEY, ENDED_KEY, MAX_DURATION_KEY

if TYPE_CHECKING:
    from coi.incus import IncusClient
    from coi.sessions.lifecycle import Place

TIMER_MODULE = "coi.sessions.timer"
# What the timer inherits of coi's environment: enough to find the daemon, the user's own
# config and the incus CLI's, nothing that could steer Python (PYTHONPATH and the like).
TIMER_ENV = ("HOME", "USER", "LOGNAME", "LANG", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "INCUS_SOCKET",
             "INCUS_DIR", "INCUS_CONF")

CHECK_SECONDS = 10.0  # how often the container is looked at while the timer waits (one REST call)
START_GRACE = 60.0  # armed before the start: a container not running by then was never started
WARN_BEFORE = 300.0  # the heads-up, for limits of twice this or more
NOTIFY_TIMEOUT = 5.0  # a message into the container may take this long, then the timer goes on
STOP_TIMEOUT = 30  # seconds of graceful stop before it is forced (``coi shutdown --timeout``)
END_TRIES = 30  # an end that fails (Incus restarting, say) is tried again every CHECK_SECONDS, this often

ENDED_BY = "max_duration"  # ``user.coi.ended_by`` and the saved metadata's ``ended_by``
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")  # an Incus instance name: safe as a file name


def check_name(container: str) -> str:
    if not _NAME.fullmatch(container):
        raise CoiError(f"container name {container!r} cannot have a session timer")
    return container


def iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def parse_iso(text: str) -> float | None:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


# ---- the records ---------------------------------------------------------------------

class TimerStore:
    """One record per limited container under ``<sessions_dir>/timers`` (0700, the user's,
    checked by ``coi.statedir``), and the timer's log beside it."""

    def __init__(self, sessions_dir: Path) -> None:
        self.root = Path(sessions_dir) / "timers"

    def record_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.json"

    def log_path(self, container: str) -> Path:
        return self.root / f"{check_name(container)}.log"

    def record(self, container: str) -> dict[str, Any] | None:
        import json

        try:
            data = json.loads(self.record_path(container).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, container: str, data: Mapping[str, Any]) -> None:
        import json

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.record_path(container)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(data), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def drop(self, container: str) -> None:
        for path in (self.record_path(container), self.log_path(container)):
            path.unlink(missing_ok=True)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if _NAME.fullmatch(p.stem))


# ---- what the timer does next (pure) ---------------------------------------------------

@dataclass(frozen=True)
class Step:
    """The timer's next step: ``wait`` (``seconds``), ``warn``, ``expire``, or the end of the
    timer without ending the session: ``gone`` (the container went) or ``unstarted`` (it
    never ran: coi's start failed, and coi removes what it made)."""

    action: str
    seconds: float = 0.0


def warn_time(deadline: float, seconds: int) -> float | None:
    """When the heads-up is due: ``WARN_BEFORE`` the end of a limit twice as long, else never."""
    return deadline - WARN_BEFORE if seconds >= 2 * WARN_BEFORE else None


def next_step(*, now: float, deadline: float, warn_at: float | None, status: str | None,
              seen_running: bool, waited: float) -> Step:
    """What the timer does now, from what it saw of the container (``status`` None: gone;
    ``seen_running``: it ran at some point; ``waited``: seconds since the timer began)."""
    if status is None:
        return Step("gone")
    if not (seen_running or status == "Running"):  # not started yet: the deadline waits for that
        if waited >= START_GRACE:
            return Step("unstarted")
        return Step("wait", max(min(CHECK_SECONDS, START_GRACE - waited), 0.01))
    if now >= deadline:
        return Step("expire")
    if warn_at is not None and now >= warn_at and status == "Running":
        return Step("warn")
    wait = CHECK_SECONDS
    for due in (deadline, warn_at):
        if due is not None and due > now:
            wait = min(wait, due - now)
    return Step("wait", max(wait, 0.01))


# ---- the process -------------------------------------------------------------------------

Notify = Callable[[str], None]
Clock = Callable[[], float]


class Timer:
    """Follows one container to its deadline (``run``), then ends its session."""

    def __init__(self, place: Place, container: str, record: Mapping[str, Any], *, notify: Notify,
                 clock: Clock = time.time, wait: Callable[[float], object] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        """``clock`` and ``wait`` (default: the stop event's, which a signal sets) are the
        timer's only sense of time, so a test can run it on a clock of its own."""
        self.place = place
        self.container = container
        self.deadline = float(record["deadline"])
        self.seconds = int(record["seconds"])
        self.max_duration = str(record["max_duration"])
        self.notify = notify
        self.clock = clock
        self.log = log or _say
        self.stop = threading.Event()
        self.wait = wait or self.stop.wait
        self.tries = 0  # of the end, once the deadline has come

    def status(self) -> str | None:
        """The container's status ("Unknown" when Incus cannot say now); None when it is gone."""
        try:
            # The instance, not its state: reading the state enters the container.
            return self.place.client.instance(self.container).get("status", "Unknown")
        except NotFoundError:
            return None
        except CoiError as exc:
            self.log(f"reading {self.container} failed: {exc.message}")
            return "Unknown"

    def run(self) -> int:
        warn_at = warn_time(self.deadline, self.seconds)
        began = self.clock()
        seen_running = False
        while not self.stop.is_set():
            status = self.status()
            now = self.clock()
            seen_running = seen_running or status == "Running"
            step = next_step(now=now, deadline=self.deadline, warn_at=warn_at, status=status,
                             seen_running=seen_running, waited=now - began)
            if step.action == "wait":
                self.wait(step.seconds)
            elif step.action == "warn":
                warn_at = None
                left = format_left(self.deadline - now)
                self.notify(f"coi: this session ends in {left} ([limits] max_duration = {self.max_duration}); "
                            "coi then stops and saves it")
            elif step.action == "expire":
                if self.expire():
                    return 0
                self.wait(CHECK_SECONDS)
            else:
                self.log(f"{self.container} {'is gone' if step.action == 'gone' else 'never started'} before "
                         "its deadline: the timer ends")
                TimerStore(self.place.sessions_dir).drop(self.container)
                return 0
        return 0

    def expire(self) -> bool:
        """The deadline: say so and mark the container (once), then what ``coi shutdown``
        does. False when that failed and is to be tried again (the container is forced to
        stop meanwhile, when Incus lets it)."""
        from coi.sessions import manage

        name, client = self.container, self.place.client
        self.tries += 1
        if self.tries == 1:
            self.log(f"{name} reached its max_duration of {self.max_duration}: stopping and saving it")
            self.notify(f"coi: this session reached its max_duration of {self.max_duration}: "
                        "coi stops and saves it now (see 'coi info')")
        note = {"ended_by": ENDED_BY, "max_duration": self.max_duration, "ended_at": iso(self.clock())}
        try:
            client.update_instance(name, config={ENDED_KEY: ENDED_BY})
            manage.shutdown(self.place, client.instance(name), timeout=STOP_TIMEOUT, note=note)
        except NotFoundError:
            pass  # removed meanwhile: nothing is left to stop
        except CoiError as exc:
            try:
                client.stop(name, force=True)
                forced = "forced it to stop"
            except CoiError as again:
                forced = f"forcing it to stop failed too ({again.message})"
            if self.tries < END_TRIES:
                self.log(f"ending {name} failed: {exc.message}; {forced}; trying again in {CHECK_SECONDS:g}s")
                return False
            self.log(f"ending {name} failed {self.tries} times: {exc.message}; {forced}; giving up "
                     f"(coi shutdown {name} or coi clean finishes it)")
        TimerStore(self.place.sessions_dir).drop(name)
        return True


def format_left(seconds: float) -> str:
    from coi.config.limits import format_duration

    return format_duration(max(1, round(seconds)))


def _say(message: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), message, flush=True)


# The tmux message: to every client of the session's tmux, until a key is pressed
# (tmux 3.2 and newer; older ones show it for their display-time). Values are arguments.
_NOTIFY_SCRIPT = ('for c in $(tmux -S "$1" list-clients -F "#{client_name}"); do '
                  'tmux -S "$1" display-message -d 0 -c "$c" "$2" 2>/dev/null || '
                  'tmux -S "$1" display-message -c "$c" "$2"; done')


def tmux_notify(client: IncusClient, container: str, *, code_uid: int, log: Callable[[str], None]) -> Notify:
    """A ``notify`` that shows a line in the session's tmux, given ``NOTIFY_TIMEOUT`` at most
    (the ``incus`` CLI in a process of its own, killed when it takes longer)."""
    from coi.sessions.commands import as_user
    from coi.sessions.spec import CODE_HOME, TMUX_SOCKET, tmux_env

    def notify(text: str) -> None:
        command = as_user(["sh", "-c", _NOTIFY_SCRIPT, "coi-notify", TMUX_SOCKET, text], uid=code_uid)
        argv = client.exec_argv(container, command, cwd=CODE_HOME, env=tmux_env(), terminal=False)
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=NOTIFY_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            log(f"the message to the tmux session of {container} took longer than {NOTIFY_TIMEOUT:g}s: left out")
        except OSError as exc:
            log(f"the message to the tmux session of {container} failed: {exc}")
    return notify


class _LogMessages:
    """The ``Messages`` of the timer's services: lines in its log."""

    def info(self, text: str) -> None:
        _say(text)

    detail = info

    def warn(self, text: str) -> None:
        _say(f"Warning: {text}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m coi.sessions.timer CONTAINER SESSIONS_DIR", file=sys.stderr)
        return 2
    container, sessions_dir = check_name(args[0]), Path(args[1]).absolute()
    os.chdir("/")  # hold no directory (a workspace) busy while the container lives
    from coi.config import load_config
    from coi.incus import Incus
    from coi.sessions.lifecycle import Place
    from coi.statedir import check_state_dir

    check_state_dir(sessions_dir)
    record = TimerStore(sessions_dir).record(container)
    if not record:
        return 0
    # The user's own config only (no workspace file): what the session's end needs.
    config = load_config(workspace=None, env=os.environ).config
    client = Incus.from_environment(project=str(record.get("project") or "default"))
    place = Place(client=client, config=config, workspace=Path(str(record.get("workspace") or "/")),
                  messages=_LogMessages(), state_dir=lambda: sessions_dir)
    timer = Timer(place, container, record,
                  notify=tmux_notify(client, container, code_uid=config.incus.code_uid, log=_say))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: timer.stop.set())
    try:
        return timer.run()
    finally:
        client.close()


# ---- starting and stopping timers (from coi) ---------------------------------------------

def timer_argv(container: str, sessions_dir: Path) -> list[str]:
    """Isolated Python (``-I``: no current directory, user site or PYTHON* variables on the
    path), so nothing from a workspace can be imported by it."""
    return [sys.executable, "-I", "-m", TIMER_MODULE, container, str(Path(sessions_dir))]


def arm(place: Place, name: str, *, max_duration: str, seconds: int, session_id: str, fresh: bool,
        clock: Clock = time.time) -> float:
    """The session's timer: a new one (``fresh``: coi starts the container now), or the one
    that runs already (the session goes on); returns the deadline. Raises CoiError when
    the timer cannot start: the session must not start without it (fail closed)."""
    store = TimerStore(place.sessions_dir)
    record = store.record(name)
    if not fresh and record and isinstance(record.get("deadline"), (int, float)):
        revive(place.sessions_dir, place.client, [name])  # the clock it has, also when its timer died
        return float(record["deadline"])
    stop_timer(store, name)
    deadline = clock() + seconds
    record = {"container": name, "session_id": session_id, "max_duration": max_duration, "seconds": seconds,
              "deadline": deadline, "armed_at": clock(), "project": getattr(place.client, "project", "default"),
              "workspace": str(place.workspace), "pid": None}
    store.save(name, record)
    try:
        record["pid"] = _start(store, name, sessions_dir=place.sessions_dir, client=place.client)
    except OSError as exc:
        store.drop(name)
        raise CoiError(f"the session timer of {name} did not start ({exc.strerror or exc}), so [limits] "
                       "max_duration could not be enforced: the session was not started",
                       "try again, or start it without a time limit: --max-duration 0") from None
    store.save(name, record)
    place.client.update_instance(name, config={MAX_DURATION_KEY: max_duration, DEADLINE_KEY: iso(deadline),
                                               ENDED_KEY: ""})
    return deadline


def revive(sessions_dir: Path, client: IncusClient, running: Iterable[str]) -> list[str]:
    """Start the timer again, on its own record (the same deadline), for each running
    container whose timer ended without ending it (killed, crashed); the names revived."""
    store = TimerStore(sessions_dir)
    revived = []
    for name in running:
        record = store.record(name) if _NAME.fullmatch(name) else None
        if not record or _alive_timer(record.get("pid"), name):
            continue
        try:
            record["pid"] = _start(store, name, sessions_dir=sessions_dir, client=client)
        except OSError:
            continue  # said nowhere better than by the caller's next try
        store.save(name, record)
        revived.append(name)
    return revived


def disarm(place: Place, name: str) -> None:
    """The container's timer stopped and its record gone (none is fine; from the timer
    itself, only the record)."""
    store = TimerStore(place.sessions_dir)
    if not _NAME.fullmatch(name):
        return  # no timer could have this name
    if store.record_path(name).exists() or store.log_path(name).exists():
        stop_timer(store, name)
        store.drop(name)


def clear_marks(client: IncusClient, name: str, instance: Mapping[str, Any]) -> None:
    """An earlier run's limit taken off the container (a start without ``max_duration``)."""
    cfg = instance.get("config") or {}
    if any(cfg.get(k) for k in (MAX_DURATION_KEY, DEADLINE_KEY, ENDED_KEY)):
        client.update_instance(name, config={MAX_DURATION_KEY: "", DEADLINE_KEY: "", ENDED_KEY: ""})


def ended_by_limit(instance: Mapping[str, Any]) -> str | None:
    """The max_duration that ended the container's session, when its timer is ending it."""
    cfg = instance.get("config") or {}
    return (cfg.get(MAX_DURATION_KEY) or "?") if cfg.get(ENDED_KEY) == ENDED_BY else None


def clean_orphans(sessions_dir: Path, existing: Iterable[str]) -> list[str]:
    """Stop the timers (and drop the records) of containers that no longer exist; returns
    their names. ``existing``: every instance that still exists, in every project."""
    existing = set(existing)
    store = TimerStore(sessions_dir)
    gone = set()
    for name in store.names():
        if name not in existing:
            stop_timer(store, name)
            store.drop(name)
            gone.add(name)
    for pid, name in _timer_processes(sessions_dir).items():
        if name not in existing:  # a timer whose record went missing
            _kill(pid, name)
            gone.add(name)
    return sorted(gone)


def _start(store: TimerStore, container: str, *, sessions_dir: Path, client: IncusClient) -> int:
    """Start the timer detached (``coi.detached``); returns its pid."""
    store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return detached.start(timer_argv(container, sessions_dir), log=store.log_path(container), keep_env=TIMER_ENV,
                          client=client)


def _is_timer(pid: int, container: str) -> bool:
    argv = detached.argv_of(pid)
    if argv == [b""] and detached.alive(pid):  # started a moment ago: its command line is not there yet
        from coi.errors import TimedOutError
        from coi.wait import wait_for

        try:
            argv = wait_for(lambda: [a for a in detached.argv_of(pid) if a] or not detached.alive(pid), timeout=2,
                            what="the session timer's command line", max_interval=0.02)
        except TimedOutError:
            return False
        argv = argv if isinstance(argv, list) else []
    return TIMER_MODULE.encode() in argv and container.encode() in argv


def _alive_timer(pid: object, container: str) -> bool:
    return isinstance(pid, int) and _is_timer(pid, container) and detached.alive(pid)


def _timer_processes(sessions_dir: Path) -> dict[int, str]:
    """This user's timer processes of ``sessions_dir``: pid -> container."""
    found = {}
    module, wanted = TIMER_MODULE.encode(), str(Path(sessions_dir)).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = detached.argv_of(int(entry))
        if module not in argv:
            continue
        args = argv[argv.index(module) + 1:]
        try:
            mine = os.stat(f"/proc/{entry}").st_uid == os.getuid()
        except OSError:
            continue
        if mine and len(args) >= 2 and args[1] == wanted:
            found[int(entry)] = args[0].decode(errors="replace")
    return found


def stop_timer(store: TimerStore, container: str) -> None:
    """End the container's timer process (not the caller itself)."""
    pid = (store.record(container) or {}).get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _is_timer(pid, container):
        _kill(pid, container)


def _kill(pid: int, container: str) -> None:
    """SIGKILL to the timer's process group (it leads one), and wait until it is gone. A
    timer in the middle of ending its session leaves what ``coi shutdown`` leaves when
    interrupted: ``coi clean`` or ``coi shutdown`` finishes it."""
    from coi.wait import wait_for

    if pid == os.getpid():
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError:
        return  # another user's timer
    wait_for(lambda: not detached.alive(pid), timeout=5, what=f"the session timer of {container} to stop",
             first_interval=0.001, max_interval=0.05)


if __name__ == "__main__":
    sys.exit(main())
