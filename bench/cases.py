"""The benchmark cases: each runs coi and its floor alternately and returns rows.

A row is one line of the table: the coi command, its floor (or none), the
ratio of their medians and the target it is held to. Every case cleans up
what it created before it returns, also when it fails.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import floor
import lab
import repo
from measure import BenchError, Proc, Series, compare, run

PREFIX = "coi-bench-"
FLOOR_PREFIX = f"{PREFIX}floor-"
LIST_CONTAINERS = 20
PARALLEL = 10
ALLOWED_DOMAINS = ["github.com", "api.github.com", "codeload.github.com", "objects.githubusercontent.com",
                   "raw.githubusercontent.com", "registry.npmjs.org", "pypi.org", "files.pythonhosted.org",
                   "deb.debian.org", "api.anthropic.com"]
# Phases as phases.py names them: set-up work, and the wait for the address before it.
NETWORK_SETUP = ("network rules", "network: resolve allowed domains")
NETWORK_WAIT = "network: wait for the address (DHCP)"
BUILD_LINE = "echo coi-bench > /etc/coi-bench-built"
HERE = Path(__file__).resolve().parent


@dataclass
class Target:
    """What a row is held to: a ratio to its floor and/or an absolute time."""

    ratio: float | None = None
    seconds: float | None = None
    text: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        parts = []
        if self.ratio is not None:
            parts.append(f"≤ {self.ratio:g}x")
        if self.seconds is not None:
            parts.append(f"< {self.seconds:g} s")
        return ", ".join(parts) or "—"


@dataclass
class Row:
    key: str
    case: str
    coi: Series
    floor: Series | None = None
    target: Target = field(default_factory=Target)
    status: str = "ok"  # ok, not available, failed
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)  # further conditions of the target

    @property
    def ratio(self) -> float | None:
        if self.floor is None or not self.floor.median or self.coi.median is None:
            return None
        return self.coi.median / self.floor.median

    @property
    def met(self) -> bool | None:
        if self.status != "ok" or self.coi.median is None:
            return None if self.status == "not available" else False
        results = list(self.checks.values())
        if self.target.ratio is not None:
            if self.ratio is None:
                return None
            results.append(self.ratio <= self.target.ratio)
        if self.target.seconds is not None:
            results.append(self.coi.median < self.target.seconds)
        return all(results) if results else None

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "status": self.status, "coi": self.coi.to_json(),
                "floor": self.floor.to_json() if self.floor else None,
                "ratio": round(self.ratio, 3) if self.ratio is not None else None,
                "target": self.target.describe(), "met": self.met, "checks": self.checks,
                "note": self.note, "extra": self.extra}


@dataclass
class Setup:
    """Where and with what the cases run; built once by run.py."""

    tmp: Path
    coi: str  # the coi executable
    python: str  # coi's interpreter
    image: str
    binary: str  # agent binary ("" = the tool's own)
    build_base: str | None  # None: coi's default base
    repeat: int
    warmup: int
    branch_files: int = repo.FILES  # the branch case's generated repository (bench/repo.py)
    branch_mib: int = repo.HISTORY_MIB
    host_uid: int = field(default_factory=os.getuid)
    host_gid: int = field(default_factory=os.getgid)
    shift: bool = False
    counter: int = 0

    @property
    def home(self) -> Path:
        return self.tmp / "home"

    @property
    def sessions(self) -> Path:
        return self.tmp / "sessions"

    def workspace(self, name: str) -> Path:
        path = self.tmp / "workspaces" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """coi's environment: the bench's prefix, image and agent, a home of its own
        (``extra`` on top: a case's own variables)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COI_") or k == "COI_DEBUG"}
        env.update({"HOME": str(self.home), "COI_CONTAINER_PREFIX": PREFIX, "COI_SESSIONS_DIR": str(self.sessions),
                    "COI_IMAGE": self.image})
        if self.binary:
            env["COI_TOOL_BINARY"] = self.binary
        env.update(extra or {})
        return env

    def coi_run(self, args: list[str], *, cwd: Path | None = None, timeout: float = 300,
                env: dict[str, str] | None = None):
        return run([self.coi, *args], env=self.env(env), cwd=str(cwd) if cwd else None, timeout=timeout)

    def floor_name(self, role: str) -> str:
        self.counter += 1
        return f"{FLOOR_PREFIX}{role}-{os.getpid()}-{self.counter}"

    def spec(self, workspace: Path, slot: int = 1) -> tuple[dict, dict]:
        config, devices, _ = floor.session_spec(image=self.image, workspace=workspace, slot=slot,
                                                host_uid=self.host_uid, host_gid=self.host_gid, shift=self.shift)
        return config, devices

    @property
    def agent(self) -> str:
        """The agent's executable name (what the session starts in tmux)."""
        return self.binary or "claude"

    def agent_argv(self) -> list[str]:
        return [self.agent, "--session-id", str(uuid.uuid4())]

    def probe(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
        """One run of ``coi ARGS`` through phases.py: phases, REST log, whole-process time."""
        out = self.tmp / f"probe-{uuid.uuid4().hex[:8]}.json"
        spawned = time.time()
        proc = run([self.python, str(HERE / "phases.py"), str(out), "--", *args], env=self.env(env), cwd=str(cwd))
        ended = time.time()
        proc.check()
        data = json.loads(out.read_text())
        out.unlink()
        if data.get("missing_targets"):
            raise RuntimeError("bench/phases.py names functions coi no longer has: "
                               + ", ".join(data["missing_targets"]) + " (update its TARGETS)")
        phases = {k: v["seconds"] for k, v in data["phases"].items()}
        phases["interpreter start"] = data["t0_wall"] - spawned
        phases["interpreter exit"] = ended - data["end_wall"]
        return {"total": proc.seconds, "phases": phases, "rest": data["rest"], "stdout": proc.stdout,
                "stderr": proc.stderr}


def quick(setup: Setup, factor: int) -> tuple[int, int]:
    """Repetitions for a case that takes tens of milliseconds: more runs, same wall time."""
    return setup.repeat * factor, setup.warmup * factor


def container_of(output: str) -> str:
    match = re.search(r"^Container: (\S+)", output, re.M)
    if not match:
        raise BenchError(f"coi did not name its container: {output.strip()[-300:]}")
    return match.group(1)


def kill(setup: Setup, name: str, env: dict[str, str] | None = None) -> None:
    """End a session the way a user would (coi also removes anything it set up for it)."""
    setup.coi_run(["kill", name], env=env)
    floor.delete_quietly(name)


def bench_processes(under: Path | str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every other process (not this one's ancestors either) with an argument naming ``under`` or a
    path below it (a directory of the bench's: coi's proxy and watchers name its sessions
    directory, the test host its certificates); ``under`` may also be a name prefix
    (``/tmp/coi-bench-``: every run's directory)."""
    prefix = str(under)
    ours, pid = set(), os.getpid()
    while pid > 1 and pid not in ours:  # this process and its ancestors (sudo, a shell): never listed
        ours.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if any(a == prefix or a.startswith(prefix if prefix.endswith(("/", "-")) else prefix + "/") for a in argv):
            found.append((int(entry), argv))
    return found


def proxy_processes(under: Path | str) -> list[int]:
    """coi's proxy processes (``python -m coi.network.proxy STATE LISTEN``) of the bench's directory."""
    return [pid for pid, argv in bench_processes(under) if "coi.network.proxy" in argv]


def wait_proxy_gone(setup: Setup, timeout: float = 10.0) -> float | None:
    """Seconds until no proxy of the bench's sessions runs (0.0: none ran); None at the deadline."""
    t0 = time.perf_counter()
    if not proxy_processes(setup.tmp):
        return 0.0
    while proxy_processes(setup.tmp):
        if time.perf_counter() - t0 >= timeout:
            return None
        time.sleep(0.01)
    return time.perf_counter() - t0


def in_parallel(funcs: list[Callable[[], Any]], workers: int) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return [f.result() for f in [pool.submit(func) for func in funcs]]


# ---- CLI start and doctor ----------------------------------------------------------


def cli_start(setup: Setup) -> list[Row]:
    repeat, warmup = quick(setup, 10)
    coi = Series("coi", "coi --version")
    base = Series("floor", f"{setup.python} -c pass")
    launcher = Series("coi without the console-script launcher",
                      f"{setup.python} -c 'from coi.cli.main import main; main()' --version")
    env = setup.env()
    compare(lambda: run([setup.coi, "--version"], env=env).check().seconds,
            lambda: run([setup.python, "-c", "pass"], env=env).check().seconds,
            coi_series=coi, floor_series=base, repeat=repeat, warmup=warmup)
    for i in range(warmup + repeat):
        seconds = run([setup.python, "-c", "import sys; from coi.cli.main import main; sys.exit(main())",
                       "--version"], env=env).check().seconds
        if i >= warmup:
            launcher.samples.append(seconds)
    head = open(setup.coi, "rb").read(200).decode("utf-8", "replace").splitlines()
    return [Row("cli_start", "CLI start", coi, base, Target(ratio=1.5),
                extra={"without_launcher": launcher.to_json(),
                       "launcher_imports_re": any(line.strip() == "import re" for line in head)})]


def doctor(setup: Setup) -> list[Row]:
    coi = Series("coi", "coi doctor")
    codes: list[int] = []

    def once() -> float:
        proc = setup.coi_run(["doctor"])
        codes.append(proc.code)
        return proc.seconds
    compare(once, None, coi_series=coi, floor_series=None, repeat=setup.repeat, warmup=setup.warmup)
    return [Row("doctor", "doctor", coi, None, Target(seconds=1.0),
                # 1 is a warning (say, mitmproxy not installed): the checks all ran
                note="" if set(codes) <= {0, 1} else f"doctor exit codes {sorted(set(codes))} (timed anyway)")]


# ---- list --------------------------------------------------------------------------


def _list_containers(setup: Setup, count: int) -> list[str]:
    """``count`` stopped containers that look like coi's (slots 1..count of one workspace)."""
    workspace = setup.workspace("list")
    digest = hashlib.sha256(os.path.abspath(workspace).encode()).hexdigest()[:8]
    names = [f"{PREFIX}{digest}-{slot}" for slot in range(1, count + 1)]

    def make(slot: int, name: str) -> None:
        floor.init(name, setup.image, *setup.spec(workspace, slot))
    in_parallel([lambda s=s, n=n: make(s, n) for s, n in enumerate(names, 1)], workers=4)
    return names


def list_case(setup: Setup) -> list[Row]:
    repeat, warmup = quick(setup, 3)
    rows: list[Row] = []
    names: list[str] = []
    try:
        for count in (0, LIST_CONTAINERS):
            if count:
                names = _list_containers(setup, count)
            shown = json.loads(setup.coi_run(["list", "--format", "json"]).check().stdout)
            if isinstance(shown, dict):  # {"active_containers": [...], "saved_sessions": [...]}
                shown = shown.get("active_containers", [])
            if len(shown) != count:
                raise BenchError(f"coi list shows {len(shown)} containers, expected {count}")
            total = len(floor.instances())
            for fmt in ("text", "json"):
                args = ["list"] + (["--format", "json"] if fmt == "json" else [])
                coi = Series("coi", "coi " + " ".join(args))
                base = Series("floor", "incus list --format json")
                compare(lambda: setup.coi_run(args).check().seconds,
                        lambda: run([floor.INCUS, "list", "--format", "json"]).check().seconds,
                        coi_series=coi, floor_series=base, repeat=repeat, warmup=warmup)
                target = Target(ratio=2.0, seconds=0.25) if count else Target()
                rows.append(Row(f"list_{count}_{fmt}", f"list, {count} containers ({fmt})", coi, base, target,
                                extra={"instances_on_daemon": total}))
        breakdown = [setup.probe(["list"], cwd=setup.tmp) for _ in range(max(1, min(setup.repeat, 3)))]
        rows[-2].extra["breakdown"] = breakdown_summary(breakdown)
    finally:
        in_parallel([lambda n=n: floor.delete_quietly(n) for n in names], workers=4)
    return rows


# ---- one-shot run ------------------------------------------------------------------


def run_case(setup: Setup) -> list[Row]:
    workspace = setup.workspace("run")
    coi = Series("coi", "coi run -- true")
    base = Series("floor", "incus init (workspace mount) + start + exec --user 1000 --cwd /workspace true + delete")
    compare(lambda: setup.coi_run(["run", "--", "true"], cwd=workspace).check().seconds,
            lambda: floor.one_shot(setup.floor_name("run"), setup.image, setup.spec(workspace)),
            coi_series=coi, floor_series=base, repeat=setup.repeat, warmup=setup.warmup)
    breakdown = [setup.probe(["run", "--", "true"], cwd=workspace) for _ in range(max(1, min(setup.repeat, 3)))]
    return [Row("run", "one-shot run", coi, base, Target(ratio=1.3),
                extra={"breakdown": breakdown_summary(breakdown)})]


# ---- session start ---------------------------------------------------------------------


class Refused(BenchError):
    """coi said no (exit code not 0), as opposed to failing on the way."""


def _coi_session(setup: Setup, workspace: Path, extra: list[str],
                 env: dict[str, str] | None = None) -> tuple[float, str]:
    """``coi shell --background`` until the agent runs in tmux; the container is left running."""
    seconds, name, _ = _coi_session_output(setup, workspace, extra, env)
    return seconds, name


def _coi_session_output(setup: Setup, workspace: Path, extra: list[str],
                        env: dict[str, str] | None = None) -> tuple[float, str, Proc]:
    """``_coi_session``, and coi's output too (what the session was given, e.g. its branch)."""
    t0 = time.perf_counter()
    proc = setup.coi_run(["shell", "--background", *extra], cwd=workspace, env=env)
    if proc.code != 0:
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith(("Error", "Hint"))]
        raise Refused(" ".join(errors) or f"coi shell exited {proc.code}: {proc.stderr.strip()[-300:]}")
    name = container_of(proc.stdout + proc.stderr)
    try:
        floor.wait_agent(name, setup.agent)
    except BaseException:
        kill(setup, name, env)
        raise
    return time.perf_counter() - t0, name, proc


def session_case(setup: Setup) -> list[Row]:
    workspace = setup.workspace("session")
    coi = Series("coi", "coi shell --background (until the agent runs in tmux)")
    base = Series("floor", "incus init (workspace mount) + start + exec tmux new-session (agent)")

    def coi_once() -> float:
        seconds, name = _coi_session(setup, workspace, [])
        kill(setup, name)
        return seconds

    def floor_once() -> float:
        name = setup.floor_name("shell")
        try:
            return floor.session_start(name, setup.image, setup.spec(workspace), setup.agent_argv())
        finally:
            floor.delete_quietly(name)
    compare(coi_once, floor_once, coi_series=coi, floor_series=base, repeat=setup.repeat, warmup=setup.warmup)
    shell, shutdown = [], []
    for _ in range(max(1, min(setup.repeat, 3))):
        probe = setup.probe(["shell", "--background"], cwd=workspace)
        name = container_of(probe["stdout"] + probe["stderr"])
        t0 = time.perf_counter()
        floor.wait_agent(name, setup.agent)
        probe["phases"]["agent start (to running in tmux)"] = time.perf_counter() - t0
        probe["total"] += probe["phases"]["agent start (to running in tmux)"]
        shell.append(probe)
        try:
            shutdown.append(setup.probe(["shutdown", name], cwd=workspace))
        finally:
            kill(setup, name)
    return [Row("session", "session start", coi, base, Target(ratio=1.5, seconds=1.5),
                extra={"breakdown": breakdown_summary(shell), "shutdown_breakdown": breakdown_summary(shutdown)})]


# ---- parallel ------------------------------------------------------------------------


def parallel_case(setup: Setup) -> list[Row]:
    workspace = setup.workspace("parallel")
    coi = Series("coi", f"{PARALLEL} x coi run -- true at once, one workspace")
    base = Series("floor", f"{PARALLEL} floor runs at once")
    rounds: list[dict[str, Any]] = []

    def coi_once() -> float:
        t0 = time.perf_counter()
        procs = in_parallel([lambda: setup.coi_run(["run", "--verbose", "--", "true"], cwd=workspace)
                             for _ in range(PARALLEL)], workers=PARALLEL)
        seconds = time.perf_counter() - t0
        slots = []
        for p in procs:
            m = re.search(r"\bslot (\d+)", p.stdout + p.stderr)
            slots.append(int(m.group(1)) if m else None)
        failed = [p for p in procs if p.code != 0]
        rounds.append({"seconds": round(seconds, 3), "succeeded": PARALLEL - len(failed), "slots": slots,
                       "errors": [(p.stderr.strip() or p.stdout.strip())[-200:] for p in failed]})
        return seconds

    def floor_once() -> float:
        t0 = time.perf_counter()
        names = [setup.floor_name("par") for _ in range(PARALLEL)]
        in_parallel([lambda n=n: floor.one_shot(n, setup.image, setup.spec(workspace)) for n in names],
                    workers=PARALLEL)
        return time.perf_counter() - t0
    # Ten containers at once take seconds: half the repetitions, at most one warm-up.
    warmup = min(setup.warmup, 1)
    compare(coi_once, floor_once, coi_series=coi, floor_series=base, repeat=max(1, setup.repeat // 2),
            warmup=warmup)
    counted = rounds[warmup:]
    all_ok = all(r["succeeded"] == PARALLEL for r in counted)
    distinct = all(None not in r["slots"] and len(set(r["slots"])) == PARALLEL for r in counted)
    note = ""
    if all_ok and not distinct:
        note = ("slots repeat: a slot is free again once its run has ended, so some runs ended before "
                "others had been given a slot (they did not all run at the same time)")
    # Two live runs on one slot would be one container name twice: a create would
    # fail, so "all succeed" covers it. Repeated slots alone are runs that did not overlap.
    return [Row("parallel", f"parallel ({PARALLEL} runs)", coi, base, Target(ratio=1.5),
                checks={"all succeed": all_ok, "no slot taken twice at once": all_ok}, note=note,
                extra={"rounds": counted, "distinct slots": distinct})]


# ---- network modes ----------------------------------------------------------------------


# The session starts compared (label -> --network value, coi's environment on top of the
# bench's). allowlist_by is set either way, so a system config cannot change what a row means.
NETWORK_MODES = {
    "open": ("open", {}),
    "restricted": ("restricted", {}),
    "allowlist": ("allowlist", {"COI_NETWORK_ALLOWLIST_BY": "address"}),
    "allowlist by name": ("allowlist", {"COI_NETWORK_ALLOWLIST_BY": "name"}),
}
BY_NAME = "allowlist by name"
BY_NAME_WARM = "allowlist by name, proxy running"
PROXY_PHASE = "network: coi's proxy (start, or find it running)"  # phases.py's name for proxy.ensure_running
BY_NAME_ADDED = 0.1  # seconds an allowlist-by-name start may add to an open one


def _mode_key(label: str) -> str:
    return "network_" + label.replace(", ", "_").replace(" ", "_")


def _mode(label: str) -> tuple[str, dict[str, str]]:
    """(--network value, environment) of a label (the warm by-name row's are by-name's)."""
    return NETWORK_MODES.get(label, NETWORK_MODES[BY_NAME])


def _mode_command(label: str) -> str:
    command = f"coi shell --background --network {_mode(label)[0]}"
    if label == "allowlist":
        command += " (allowlist_by = address)"
    elif label == BY_NAME:
        command += " (allowlist_by = name: coi's proxy starts, no other session holds it)"
    elif label == BY_NAME_WARM:
        command += " (allowlist_by = name, coi's proxy already running for another session)"
    return command


def network_case(setup: Setup) -> list[Row]:
    """Session starts in every network mode against open. The allowlist by name twice:
    the user's only session (coi starts its proxy and, at ``coi kill``, ends it again) and
    a session while another one of the user keeps the proxy running."""
    workspace = setup.workspace("network")  # the allowlist's domains are in the user config (run.py)
    series = {label: Series("coi", _mode_command(label)) for label in NETWORK_MODES}
    refused: dict[str, str] = {}
    # Four modes, each a session start: about half the repetitions, at most one warm-up.
    repeat, warmup = max(1, setup.repeat // 2 + 1), min(setup.warmup, 1)

    def start(label: str) -> tuple[float, str]:
        mode, env = _mode(label)
        if label == BY_NAME and wait_proxy_gone(setup) is None:  # its start, not the last one's end
            raise BenchError("coi's proxy did not end within 10 s of the last allowlist-by-name session")
        return _coi_session(setup, workspace, ["--network", mode], env)

    def rounds(labels: list[str], into: dict[str, Series]) -> None:
        for i in range(warmup + repeat):
            for label in labels if i % 2 == 0 else labels[::-1]:
                if label in refused:
                    continue
                try:
                    seconds, name = start(label)
                except Refused as exc:
                    refused[label] = str(exc)
                    continue
                kill(setup, name, _mode(label)[1])
                if i >= warmup:
                    into[label].samples.append(seconds)

    def probes(label: str, runs: int) -> dict[str, Any] | None:
        if label in refused:
            return None
        mode, env = _mode(label)
        out = []
        for _ in range(runs):
            if label == BY_NAME and wait_proxy_gone(setup) is None:
                raise BenchError("coi's proxy did not end within 10 s of the last allowlist-by-name session")
            probe = setup.probe(["shell", "--background", "--network", mode], cwd=workspace, env=env)
            kill(setup, container_of(probe["stdout"] + probe["stderr"]), env)
            out.append(probe)
        return breakdown_summary(out)

    rounds(list(series), series)
    breakdown = {label: probes(label, 1 if label == "open" else max(1, min(setup.repeat, 3))) for label in series}

    # The allowlist by name with the proxy already running: a keeper session of the same
    # user holds it (started first, not timed); open is timed again alongside, as its floor.
    warm = {"open": Series("floor", "coi shell --background --network open (while the keeper session runs)"),
            BY_NAME_WARM: Series("coi", _mode_command(BY_NAME_WARM))}
    keeper = None
    if BY_NAME not in refused:
        try:
            _, keeper = start(BY_NAME)
            rounds(["open", BY_NAME_WARM], warm)
            breakdown[BY_NAME_WARM] = probes(BY_NAME_WARM, max(1, min(setup.repeat, 3)))
        except Refused as exc:
            refused[BY_NAME_WARM] = str(exc)
        finally:
            if keeper is not None:
                kill(setup, keeper, _mode(BY_NAME)[1])
    else:
        refused[BY_NAME_WARM] = refused[BY_NAME]

    rows = []
    targets = {"restricted": 0.1, "allowlist": 0.3}
    for label, s in [*series.items(), (BY_NAME_WARM, warm[BY_NAME_WARM])]:
        base = warm["open"] if label == BY_NAME_WARM else series["open"]
        if label in (BY_NAME, BY_NAME_WARM):
            target = Target(text=f"within {BY_NAME_ADDED * 1000:.0f} ms of open")
        else:
            target = Target(text=f"set-up < {targets[label] * 1000:.0f} ms" if label in targets else "—")
        row = Row(_mode_key(label), f"network {label}", s, base if label != "open" else None, target,
                  extra={"breakdown": breakdown.get(label)})
        if label in refused:
            row.status, row.note = "not available", refused[label]
        elif label != "open" and base.median is not None and s.median is not None:
            phases = (breakdown.get(label) or {}).get("phases", {})
            setup_work = [phases[p]["median"] for p in NETWORK_SETUP if p in phases]
            wait = phases.get(NETWORK_WAIT, {}).get("median")
            proxy = phases.get(PROXY_PHASE, {}).get("median")
            delta = s.median - base.median
            row.extra.update({"delta_vs_open": delta, "rule_setup": sum(setup_work) if setup_work else None,
                              "address_wait": wait, "proxy_phase": proxy})
            if label in (BY_NAME, BY_NAME_WARM):
                row.checks["added"] = delta <= BY_NAME_ADDED
                row.target.text += f": {delta * 1000:+.0f} ms"
                parts = [f"{delta * 1000:+.0f} ms against open (medians)"]
                if setup_work:
                    parts.append(f"rule set-up {sum(setup_work) * 1000:.0f} ms")
                if proxy is None:
                    parts.append("no proxy phase seen (an older coi, or allowlist_by not honoured)")
                else:
                    parts.append(f"coi's proxy {proxy * 1000:.0f} ms ("
                                 + ("started for this session" if label == BY_NAME else "found running") + ")")
                row.note = "; ".join(parts)
            elif not setup_work:
                row.note = "no network set-up seen in coi (no network module in use): the mode changes nothing"
            else:
                row.checks["rule set-up"] = sum(setup_work) < targets[label]
                row.note = (f"rule set-up (rules + DNS) {sum(setup_work) * 1000:.0f} ms"
                            + (f"; before it, waiting for the container's DHCP address {wait * 1000:.0f} ms"
                               if wait else ""))
        rows.append(row)
    if BY_NAME not in refused and wait_proxy_gone(setup) is None:
        rows.append(_proxy_left_row("network_proxy_ended"))
    return rows


# ---- the egress proxy (allowlist by name) --------------------------------------------------

PROXY_NAMES = ("one.coi-bench.test", "two.coi-bench.test")  # served on one address; both allowed
PROXY_UNLISTED = "unlisted.coi-bench.test"  # answered by the test host too, but not allowed
PROXY_CONNECTS = 20  # connections of each kind per probe run (one run per mode and round)
PROXY_CONNECT_WARMUP = 2  # uncounted first connections of each probe run
PROXY_DOWNLOADS = 3  # downloads of each kind per probe run (CPU-bound: noisy on a small machine)
PROXY_SETUP_ADDED = 0.005  # seconds the proxy may add to a connection set-up
PROXY_THROUGHPUT_LOSS = 0.10  # share of a download's throughput the proxy may cost
PROBE_IN_CONTAINER = "/tmp/coi-bench-netprobe.py"
CA_IN_CONTAINER = "/tmp/coi-bench-lab-ca.pem"
BIG_BYTES = 200 * 1024 * 1024  # labserver.BIG_BYTES: /big


def _proxy_home(setup: Setup) -> Path:
    """A second home of the bench's: the same placeholder credentials, a config that lists
    the test host's names, allows by name, and lets the proxy reach a private address (the
    test host's /30; coi refuses private upstreams otherwise)."""
    home = setup.tmp / "home-proxy"
    shutil.copytree(setup.home, home, dirs_exist_ok=True)
    config = home / ".config" / "coi" / "config.toml"
    config.write_text("[network]\nallowed_domains = [" + ", ".join(f'"{n}"' for n in PROXY_NAMES) + "]\n"
                      'allowlist_by = "name"\nblock_private_networks = false\n')
    return home


def _proxy_port_in_use(timeout: float = 10.0) -> str | None:
    """``gateway:port`` when something listens on this user's proxy port on coi's bridge
    (another coi of the same user, e.g. a test run as root) and still does after
    ``timeout`` seconds (one that is ending gets them): the bench's session would meet
    that proxy, which knows nothing of it."""
    import socket

    try:
        from coi.host.daemon import COI_NETWORK
        from coi.network.egress import proxy_port
    except ImportError:
        return None
    proc = run([floor.INCUS, "query", f"/1.0/networks/{COI_NETWORK}"])
    if proc.code != 0:
        return None
    gateway = (json.loads(proc.stdout).get("config") or {}).get("ipv4.address", "").split("/")[0]
    if not gateway:
        return None
    listen = (gateway, proxy_port(os.getuid()))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(listen, timeout=0.5):
                pass
        except OSError:
            return None
        if time.monotonic() >= deadline:
            return f"{gateway}:{listen[1]}"
        time.sleep(0.1)


def _netprobe(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """bench/netprobe.py in the container (as root: the network is the same for every user)."""
    proc = run([floor.INCUS, "exec", name, "--", "python3", PROBE_IN_CONTAINER, json.dumps(spec)], timeout=900)
    if proc.code != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise BenchError(f"the timing script in {name} failed: {' / '.join(last)}")
    return json.loads(proc.stdout)


def proxy_case(setup: Setup) -> list[Row]:
    """What coi's proxy adds to connections: one session in open mode (the floor) and one in
    allowlist-by-name mode, both running, time connections and downloads to a test host
    of the bench's (bench/lab.py) with bench/netprobe.py, alternately."""
    if shutil.which("openssl") is None:
        raise BenchError("the proxy case needs openssl (the test host's certificates)")
    if wait_proxy_gone(setup) is None:  # an earlier case's (network) proxy, still ending
        raise BenchError("coi's proxy of an earlier case still runs 10 s after its last session")
    taken = _proxy_port_in_use()
    if taken:
        raise BenchError(f"something already listens on coi's proxy port {taken} (another coi of uid "
                         f"{os.getuid()}, e.g. a test run): run the bench alone")
    workspace = setup.workspace("proxy")
    host = lab.Lab(setup.tmp / "lab", list(PROXY_NAMES), python=setup.python)
    modes = {"open": ["--network", "open"], "name": ["--network", "allowlist"]}
    sessions: dict[str, str] = {}
    env: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    refusals: dict[str, list[list[Any]]] = {m: [] for m in modes}
    note, problems, proxy_end = "", [], None
    try:
        host.start()
        env = {"HOME": str(_proxy_home(setup)), "COI_NETWORK_ALLOWLIST_BY": "name",
               "COI_NETWORK_RESOLVER": host.resolver}
        for mode, args in modes.items():
            try:
                sessions[mode] = _coi_session(setup, workspace, args, env)[1]
            except Refused as exc:
                note = f"coi refused the {mode} session: {exc}"
                break
            run([floor.INCUS, "file", "push", str(HERE / "netprobe.py"), f"{sessions[mode]}{PROBE_IN_CONTAINER}"]
                ).check()
            run([floor.INCUS, "file", "push", str(host.ca_pem), f"{sessions[mode]}{CA_IN_CONTAINER}"]).check()
        if not note:
            spec = {"address": host.address, "tls_name": PROXY_NAMES[0], "http_name": PROXY_NAMES[1],
                    "refused_name": PROXY_UNLISTED, "ca": CA_IN_CONTAINER, "connects": PROXY_CONNECTS,
                    "warmup": PROXY_CONNECT_WARMUP, "downloads": PROXY_DOWNLOADS, "big_bytes": BIG_BYTES}
            order = list(modes)
            for i in range(setup.warmup + setup.repeat):
                for mode in order if i % 2 == 0 else order[::-1]:
                    result = _netprobe(sessions[mode], spec)
                    refusals[mode].append(result["refused_check"])
                    if i >= setup.warmup:
                        for key, values in result.items():
                            if key != "refused_check":
                                samples[mode].setdefault(key, []).extend(values)
    finally:
        for mode in modes:  # by name last: the proxy ends with the user's last such session
            if mode in sessions:
                kill(setup, sessions[mode], env or None)
        if "name" in sessions:
            proxy_end = wait_proxy_gone(setup)
        problems = host.close()
    if problems:
        raise BenchError("the proxy case left " + ", ".join(problems))
    return _proxy_rows(samples, refusals, note, proxy_end, "name" in sessions,
                       {"subnet": host.subnet, "address": host.address, "names": list(PROXY_NAMES),
                        "resolver": host.resolver, "connects_per_round": PROXY_CONNECTS,
                        "downloads_per_round": PROXY_DOWNLOADS, "rounds": setup.repeat, "big_bytes": BIG_BYTES})


def _proxy_rows(samples: dict[str, dict[str, list[float]]], refusals: dict[str, list[list[Any]]], note: str,
                proxy_end: float | None, proxy_started: bool, extra: dict[str, Any]) -> list[Row]:
    """The case's rows: connection set-up (added ms) and downloads (throughput lost), each
    for TLS and HTTP; a failed row when the proxy outlived its last session."""
    # The measurement is of the proxy only when the name session's connections went through
    # it: a name it does not list is refused there (403) and answered without it (200).
    checks = {"through the proxy":
              bool(refusals["name"]) and all(r[0] == 403 for r in refusals["name"])
              and bool(refusals["open"]) and all(r[0] == 200 for r in refusals["open"])}
    extra = {**extra, "unlisted_name_answers": refusals,
             "proxy_end_seconds": round(proxy_end, 4) if proxy_end is not None else None}
    rows = []
    specs = [("proxy_tls_setup", "connection set-up through the proxy (TLS)", "tls_setup",
              f"TCP connect + TLS handshake to :443 (SNI {PROXY_NAMES[0]}, lab CA verified)"),
             ("proxy_http_setup", "connection set-up through the proxy (HTTP)", "http_request",
              f"TCP connect to :80 + GET / (Host {PROXY_NAMES[1]}) to its whole answer"),
             ("proxy_https_download", f"{BIG_BYTES >> 20} MiB download through the proxy (TLS)", "https_download",
              "connect + handshake + GET /big over HTTPS to its last byte"),
             ("proxy_http_download", f"{BIG_BYTES >> 20} MiB download through the proxy (HTTP)", "http_download",
              "connect + GET /big over HTTP to its last byte")]
    for key, label, kind, what in specs:
        coi = Series("coi", f"{what}, allowlist by name", samples["name"].get(kind, []))
        base = Series("floor", "the same from an open-mode session", samples["open"].get(kind, []))
        row = Row(key, label, coi, base, Target(text="—"), extra=dict(extra))
        if note:
            row.status, row.note = "not available", note
        elif coi.median is not None and base.median is not None:
            row.checks.update(checks)
            if kind.endswith("download"):
                loss = 1 - base.median / coi.median
                mbps = {m: BIG_BYTES / s.median / 1e6 for m, s in (("proxy", coi), ("open", base))}
                row.target.text = f"throughput loss ≤ {PROXY_THROUGHPUT_LOSS:.0%}: {loss:.1%}"
                row.checks["throughput loss"] = loss <= PROXY_THROUGHPUT_LOSS
                row.extra.update({"throughput_loss": round(loss, 4),
                                  "throughput_mb_s": {k: round(v, 1) for k, v in mbps.items()}})
                row.note = f"{mbps['proxy']:.0f} MB/s through the proxy, {mbps['open']:.0f} MB/s without"
            else:
                added = coi.median - base.median
                row.target.text = f"adds ≤ {PROXY_SETUP_ADDED * 1000:g} ms: {added * 1000:+.1f} ms"
                row.checks["added"] = added <= PROXY_SETUP_ADDED
                row.extra["added_seconds"] = round(added, 5)
                row.note = f"median of {len(coi.samples)} connections each"
        rows.append(row)
    if proxy_started and proxy_end is None:
        rows.append(_proxy_left_row("proxy_ended"))
    return rows


def _proxy_left_row(key: str) -> Row:
    return Row(key, "coi's proxy ends with its last session", Series("coi", "coi kill"), status="failed",
               note="coi's proxy still ran 10 s after the last allowlist-by-name session was killed "
                    "(the suite's clean-up ends it)")


# ---- build -----------------------------------------------------------------------------


def build_case(setup: Setup) -> list[Row]:
    """A build takes tens of seconds (publishing dominates), so it runs ``repeat // 4``
    times (at least once); its one warm-up is a coi build through phases.py, which
    also warms the base image's caches for the floor."""
    script = setup.tmp / "one-line.sh"
    script.write_text(BUILD_LINE + "\n")
    alias, floor_alias = f"{PREFIX}image", f"{FLOOR_PREFIX}image"
    base = setup.build_base or _default_build_base(setup)
    base_args = ["--base", setup.build_base] if setup.build_base else []
    args = ["build", "custom", alias, "--script", str(script), *base_args]
    coi = Series("coi", f"coi build custom {alias} --script one-line.sh" + (f" --base {base}" if base_args else ""))
    fl = Series("floor", "incus launch + exec + stop + publish (uncompressed) + delete")
    launch = Series("coi", f"incus launch {alias} (first launch of the built image)")
    floor_launch = Series("floor", f"incus launch {floor_alias} (first launch of the floor's image)")
    sizes: list[int] = []
    breakdown: list[dict[str, Any]] = []
    if setup.warmup:
        try:
            breakdown.append(setup.probe(args, cwd=setup.tmp))
        finally:
            floor.delete_image(alias)

    def first_launch(image: str, series: Series) -> None:
        name = setup.floor_name("launch")
        try:
            series.samples.append(floor.launch(image, name))
        finally:
            floor.delete_quietly(name)

    def coi_once() -> float:
        try:
            seconds = setup.coi_run(args, timeout=900).check().seconds
            sizes.append(floor.image_size(alias) or 0)
            first_launch(alias, launch)
        finally:
            floor.delete_image(alias)
        return seconds

    def floor_once() -> float:
        try:
            seconds = floor.build(setup.floor_name("build"), floor_alias, base, BUILD_LINE)
            if not floor_launch.samples:  # unpacking takes seconds: once is enough to show it
                first_launch(floor_alias, floor_launch)
        finally:
            floor.delete_image(floor_alias)
        return seconds
    compare(coi_once, floor_once, coi_series=coi, floor_series=fl, repeat=max(1, setup.repeat // 4), warmup=0)
    return [Row("build", "build (warm, one-line script)", coi, fl, Target(seconds=30.0),
                extra={"base": base, "image_size_bytes": sizes,
                       "breakdown": breakdown_summary(breakdown) if breakdown else None}),
            Row("build_launch", "launch a built image", launch, floor_launch, Target(seconds=0.5),
                note="coi unpacks a new image on the pool during the build; the floor's first launch does it")]


def _default_build_base(setup: Setup) -> str:
    """The base ``coi build custom`` uses without --base: the coi image."""
    if floor.image_fingerprint("coi") is None:
        raise BenchError("coi build custom needs the coi image as its default base; pass --build-base IMAGE")
    return "coi"


# ---- branch sessions ---------------------------------------------------------------------

BRANCH_ADDED = 1.0  # seconds a branch session's copy may add to the session start
REFILL_TIMEOUT = 600.0  # a refill (a checkout of every file) that takes longer fails the case


def _branch_root(setup: Setup, workspace: Path) -> Path:
    """``<sessions>/branches/<workspace hash>``: the workspace's copies, spare and lock (coi
    hashes its working directory, the real path)."""
    return setup.sessions / "branches" / hashlib.sha256(os.path.realpath(workspace).encode()).hexdigest()[:8]


def _wait_unlocked(path: Path, timeout: float) -> None:
    """Take and release ``path``'s exclusive flock: back once its holder let go. The blocking
    flock runs in a thread, so a refill that never ends is an error, not a hang."""
    failed: list[BaseException] = []

    def take() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                os.close(fd)  # closing releases it
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failed.append(exc)
    thread = threading.Thread(target=take, name="coi-bench-spare-lock", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BenchError(f"timed out after {timeout:g}s waiting for the spare copy's refill ({path})")
    if failed:
        raise BenchError(f"cannot wait for {path}: {failed[0]}")


def _wait_spare(root: Path) -> bool:
    """Wait for the workspace's spare refill to end; True when a spare copy is then ready.

    coi takes the spare's lock before it starts the refill and hands it over, so from
    coi's exit until the spare is ready the lock is held. No lock file: this coi keeps no
    spare here.
    """
    lock, spare = root / ".spare.lock", root / ".spare"
    if not lock.exists():
        return False
    _wait_unlocked(lock, REFILL_TIMEOUT)
    return spare.is_dir()


def wait_refills(sessions: Path, timeout: float = 120.0) -> list[str]:
    """Wait for every spare refill under ``sessions`` to end, so none still writes there when
    run.py removes the temporary directory; returns the locks still held at the deadline."""
    held: list[str] = []
    for lock in sorted((sessions / "branches").glob("*/.spare.lock")):
        try:
            _wait_unlocked(lock, timeout)
        except BenchError:
            held.append(str(lock))
    return held


def _drop_spare(root: Path) -> None:
    """No spare for the next session (a first session of a workspace): the refill waited
    for, then the spare removed under its lock."""
    _wait_spare(root)
    lock, spare = root / ".spare.lock", root / ".spare"
    if not lock.exists():
        shutil.rmtree(spare, ignore_errors=True)
        return
    with open(lock, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        shutil.rmtree(spare, ignore_errors=True)
    if spare.exists():
        raise BenchError(f"cannot remove the spare copy {spare}")


def _branch_of(proc: Proc) -> str:
    """NAME of the session's branch ``coi/NAME``: from the JSON, else the ``Branch:`` line."""
    try:
        branch = json.loads(proc.stdout).get("branch") or ""
    except (ValueError, AttributeError):
        branch = ""
    if not branch:
        match = re.search(r"^Branch: (\S+)", proc.stderr + proc.stdout, re.M)
        branch = match.group(1) if match else ""
    if not branch.startswith("coi/"):
        raise BenchError(f"coi did not name the session's branch: {(proc.stdout + proc.stderr).strip()[-300:]}")
    return branch.removeprefix("coi/")


def _branch_cleanup(setup: Setup, workspace: Path, root: Path) -> list[str]:
    """The case's sessions, copies, branches and spare gone (also after a failure); returns
    what could not be removed."""
    problems: list[str] = []
    real = os.path.realpath(workspace)
    try:
        for inst in floor.instances():
            if inst["name"].startswith(PREFIX) and (inst.get("config") or {}).get("user.coi.workspace") == real:
                kill(setup, inst["name"])
    except BenchError as exc:
        problems.append(f"sessions of {workspace}: {exc}")
    for meta in sorted((root / ".meta").glob("*.json")):
        proc = setup.coi_run(["discard", meta.stem, "--force"], cwd=workspace)
        if proc.code != 0:
            problems.append(f"coi discard {meta.stem}: {(proc.stderr.strip() or proc.stdout.strip())[-200:]}")
    try:
        _wait_spare(root)  # no refill may still write there when the directory goes
    except BenchError as exc:
        problems.append(str(exc))
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        problems.append(f"directory {root}")
    return problems


def branch_case(setup: Setup) -> list[Row]:
    """``coi shell --background --branch`` on a generated repository (bench/repo.py)
    against ``coi shell --background`` on the same one: what the branch copy adds to the
    start, with the spare copy ready and without one (the full checkout)."""
    workspace = setup.workspace("branch")
    try:
        info = repo.ensure(workspace, files=setup.branch_files, history_mib=setup.branch_mib)
    except (repo.RepoError, OSError) as exc:
        raise BenchError(f"generating the repository: {exc}") from exc
    root = _branch_root(setup, workspace)
    size = f"{info.files:,} files, {info.count_objects.get('size-pack', '?')} of history"
    spare = Series("coi", f"coi shell --background --branch, spare copy ready ({size}; until the agent runs)")
    cold = Series("coi", f"coi shell --background --branch, no spare: the full checkout ({size})")
    base = Series("floor", "coi shell --background on the same repository, without --branch")
    ready: list[bool] = []

    def branch_once(with_spare: bool) -> float:
        if with_spare:
            ready.append(_wait_spare(root))
        else:
            _drop_spare(root)
        os.sync()  # the last refill's and discard's writes out of the way of this start
        seconds, name, proc = _coi_session_output(setup, workspace, ["--branch", "--format", "json"])
        try:
            branch = _branch_of(proc)
        finally:
            kill(setup, name)
        setup.coi_run(["discard", branch, "--force"], cwd=workspace).check()
        return seconds

    def floor_once() -> float:
        _wait_spare(root)
        os.sync()
        seconds, name = _coi_session(setup, workspace, [])
        kill(setup, name)
        return seconds

    first: float | None = None
    note = ""
    try:
        # Uncounted: the workspace's first branch session, which also makes the first spare.
        first = branch_once(False)
        runs = [(lambda: branch_once(True), spare), (lambda: branch_once(False), cold), (floor_once, base)]
        for i in range(setup.warmup + setup.repeat):
            for func, series in runs if i % 2 == 0 else runs[::-1]:
                seconds = func()
                if i >= setup.warmup:
                    series.samples.append(seconds)
    except Refused as exc:
        note = str(exc)
    finally:
        left = _branch_cleanup(setup, workspace, root)
    if left:
        raise BenchError("the branch case left " + "; ".join(left))
    counted = ready[setup.warmup:]
    extra = {"repo": info.to_json(), "repo_generate_seconds": info.generate_seconds, "repo_cached": info.cached,
             "repo_count_objects": info.count_objects, "repo_pack_bytes": info.pack_bytes,
             "first_session_seconds": round(first, 4) if first is not None else None}
    rows = []
    for key, label, series in (("branch_spare", "branch session start (spare copy ready)", spare),
                               ("branch_no_spare", "branch session start (no spare: first session of a workspace)",
                                cold)):
        added = series.median - base.median if series.median is not None and base.median is not None else None
        shown = f"{added:+.2f} s" if added is not None else "?"
        target = f"adds ≤ {BRANCH_ADDED:g} s: {shown}" if key == "branch_spare" else f"— (adds {shown})"
        row = Row(key, label, series, base, Target(text=target),
                  extra={**extra, "added_seconds": round(added, 4) if added is not None else None},
                  note=f"adds {shown} to the start (coi median minus floor median)" if added is not None else "")
        if note:
            row.status, row.note = "not available", note
        elif key == "branch_spare" and added is not None:
            row.checks["added"] = added <= BRANCH_ADDED
            row.checks["spare ready before each run"] = bool(counted) and all(counted)
            row.extra["spare_ready"] = counted
            if not all(counted):
                row.note += f"; no spare was ready before {counted.count(False)} of {len(counted)} run(s)"
        rows.append(row)
    return rows


# ---- snapshots ------------------------------------------------------------------------------

SNAPSHOT_MARKER = "/root/coi-bench-after-the-snapshot"  # written after the snapshot: a restore removes it


def _marker_gone(name: str) -> bool:
    """Whether the marker written after the snapshot is gone (the restore really happened)."""
    return run([floor.INCUS, "exec", name, "--", "test", "-e", SNAPSHOT_MARKER]).code == 1


def snapshot_case(setup: Setup) -> list[Row]:
    """``coi snapshot create`` and ``restore`` of a running session (stopped, restored, started
    with its rules, the agent again in tmux) and of a stopped container, against ``incus
    snapshot create/restore`` on a container made the same way (the floor's agent started
    again by the floor for the running row). One session and one floor container serve
    every row; both go at the end with their snapshots."""
    workspace = setup.workspace("snapshot")
    repeat, warmup = quick(setup, 2)
    create = Series("coi", "coi snapshot create NAME (a running session, the workspace's only one)")
    create_floor = Series("floor", "incus snapshot create CONTAINER NAME")
    running = Series("coi", "coi snapshot restore NAME --force (running session: until the agent runs again)")
    running_floor = Series("floor", "incus snapshot restore (Incus stops and starts it) + exec tmux new-session "
                                    "(agent), until it runs")
    stopped = Series("coi", "coi snapshot restore NAME --force (stopped container)")
    stopped_floor = Series("floor", "incus snapshot restore CONTAINER NAME (stopped)")
    fname = setup.floor_name("snap")
    name = ""
    checks: dict[str, bool] = {}
    breakdown: list[dict[str, Any]] = []
    counter = iter(range(1, 1 << 20))
    try:
        _, name = _coi_session(setup, workspace, [])
        # The floor's container in a workspace of its own: with coi's keys it would be a second
        # session of coi's workspace, and coi would ask which one (--container).
        floor.session_start(fname, setup.image, setup.spec(setup.workspace("snapshot-floor")), setup.agent_argv())

        def coi_create() -> float:
            return setup.coi_run(["snapshot", "create", f"b{next(counter)}"], cwd=workspace).check().seconds

        compare(coi_create, lambda: floor.snapshot_create(fname, f"b{next(counter)}"),
                coi_series=create, floor_series=create_floor, repeat=repeat, warmup=warmup)
        setup.coi_run(["snapshot", "create", "base"], cwd=workspace).check()
        floor.snapshot_create(fname, "base")

        def coi_restore_running() -> float:
            t0 = time.perf_counter()
            setup.coi_run(["snapshot", "restore", "base", "--force"], cwd=workspace).check()
            floor.wait_agent(name, setup.agent)
            return time.perf_counter() - t0

        run([floor.INCUS, "exec", name, "--", "touch", SNAPSHOT_MARKER]).check()
        compare(coi_restore_running, lambda: floor.snapshot_restore_session(fname, "base", setup.agent_argv()),
                coi_series=running, floor_series=running_floor, repeat=setup.repeat, warmup=setup.warmup)
        checks["a restore removes what was written after the snapshot"] = _marker_gone(name)
        for _ in range(max(1, min(setup.repeat, 3))):
            probe = setup.probe(["snapshot", "restore", "base", "--force"], cwd=workspace)
            floor.wait_agent(name, setup.agent)
            breakdown.append(probe)

        setup.coi_run(["container", "stop", "--force", name]).check()
        run([floor.INCUS, "stop", "--force", fname]).check()
        compare(lambda: setup.coi_run(["snapshot", "restore", "base", "--force"], cwd=workspace).check().seconds,
                lambda: floor.snapshot_restore(fname, "base"),
                coi_series=stopped, floor_series=stopped_floor, repeat=repeat, warmup=warmup)
        checks["a stopped container stays stopped"] = floor.status(name) == "Stopped"
    finally:
        if name:
            kill(setup, name)
        floor.delete_quietly(fname)
    return [Row("snapshot_create", "snapshot create (running session)", create, create_floor,
                Target(ratio=2.0, seconds=0.5)),
            Row("snapshot_restore_running", "snapshot restore (running session, agent again)", running,
                running_floor, Target(ratio=1.5), checks={k: v for k, v in checks.items() if "removes" in k},
                extra={"breakdown": breakdown_summary(breakdown)}),
            Row("snapshot_restore_stopped", "snapshot restore (stopped container)", stopped, stopped_floor,
                Target(ratio=2.0, seconds=0.5), checks={k: v for k, v in checks.items() if "stopped" in k})]


# ---- breakdowns ----------------------------------------------------------------------------


def breakdown_summary(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over probe runs of each phase's time and of the REST requests it made."""
    import statistics

    names: list[str] = []
    for p in probes:
        names += [n for n in p["phases"] if n not in names]
    per_probe = []
    for p in probes:
        rest: dict[str, list[float]] = {}
        for req in p["rest"]:
            rest.setdefault(req["phase"], []).append(req["seconds"])
        per_probe.append(rest)
    phases: dict[str, dict[str, Any]] = {}
    for n in names:
        phases[n] = {"median": statistics.median(p["phases"].get(n, 0.0) for p in probes)}
        if any(n in r for r in per_probe):
            phases[n]["rest_requests"] = statistics.median(len(r.get(n, [])) for r in per_probe)
            phases[n]["rest_seconds"] = statistics.median(sum(r.get(n, [])) for r in per_probe)
    return {"runs": len(probes), "total_median": statistics.median(p["total"] for p in probes),
            "phases": phases, "rest_log": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                           for r in probes[0]["rest"]]}


CASES: dict[str, Callable[[Setup], list[Row]]] = {
    "cli_start": cli_start,
    "doctor": doctor,
    "list": list_case,
    "run": run_case,
    "session": session_case,
    "parallel": parallel_case,
    "network": network_case,
    "proxy": proxy_case,
    "build": build_case,
    "branch": branch_case,
    "snapshot": snapshot_case,
}
