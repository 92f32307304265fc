"""coi's benchmark suite: coi's commands against bare ``incus`` doing the same work.

    sudo /opt/coi/bin/python bench/run.py [--repeat N] [--warmup N] [--json PATH] [--cases a,b]
        [--branch-repo-files N --branch-repo-mb M]

The first line names the machine. Every case times whole processes, coi and
its floor alternately, and reports min/median/max (warm-up runs are not
counted); the table is Markdown, the JSON file (default
bench/results/latest.json) has every sample. Everything the suite creates is
named ``coi-bench-*`` (containers, images, the proxy case's network namespace and
temporary directory) and removed at the end, also after a failure or Ctrl+C.
See docs/benchmarks.md for the latest results and how to read them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor  # noqa: E402 - the bench's own modules, next to this file
import lab  # noqa: E402
import repo  # noqa: E402
from cases import (ALLOWED_DOMAINS, CASES, PREFIX, Row, Setup, bench_processes, in_parallel,  # noqa: E402
                   wait_refills)
from measure import BenchError, Series, run  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SANDBOX_IMAGE = "coi-sandbox-test"  # the tests' image: tmux and the stand-in agent fake-claude
SANDBOX_AGENT = "fake-claude"
BENCH_SANDBOX = f"{PREFIX}sandbox"  # built from the tests' recipe when neither image exists
PHASE_ORDER = ["interpreter start", "imports", "config", "shift check", "slot allocation", "create", "start",
               "wait ready", "network: wait for the address (DHCP)", "network: resolve allowed domains", "network rules",
               "network: coi's proxy (start, or find it running)", "credential copy", "restore state", "tmux check", "tmux start",
               "agent start (to running in tmux)", "subprocesses", "list instances", "render", "stop", "save",
               "delete", "base image check", "launch builder", "wait network", "exec in builder", "publish",
               "delete builder", "unpack image", "doctor checks", "other", "interpreter exit"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="counted runs per case (default 5; cheap cases x3/x10)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    p.add_argument("--json", default=str(HERE / "results" / "latest.json"), metavar="PATH",
                   help="where to write the machine-readable results (default bench/results/latest.json)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset (default: all: {','.join(CASES)})")
    p.add_argument("--image", help=f"image for run/session cases (default {SANDBOX_IMAGE}, else coi)")
    p.add_argument("--coi", help="the coi executable to measure (default: coi on PATH)")
    p.add_argument("--build-base", help="base of the build case (default: coi build custom's own, the coi image)")
    p.add_argument("--branch-repo-files", type=int, default=repo.FILES, metavar="N",
                   help=f"files in the branch case's generated repository (default {repo.FILES:,})")
    p.add_argument("--branch-repo-mb", type=int, default=repo.HISTORY_MIB, metavar="M",
                   help=f"MiB of history in that repository (default {repo.HISTORY_MIB})")
    args = p.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be at least 1 and --warmup at least 0")
    if args.branch_repo_files < 1 or args.branch_repo_mb < 0:
        p.error("--branch-repo-files must be at least 1 and --branch-repo-mb at least 0")
    return args


# ---- the machine -------------------------------------------------------------------


def query(path: str) -> Any:
    return json.loads(run([floor.INCUS, "query", path]).check().stdout)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    server = query("/1.0")
    pool_name = (query("/1.0/profiles/coi").get("devices", {}).get("root") or {}).get("pool", "?")
    pool = query(f"/1.0/storage-pools/{pool_name}")
    source = pool.get("config", {}).get("source", "")
    instances = floor.instances()
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = platform.platform()
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "storage_pool": pool_name, "storage_driver": pool.get("driver"),
            "storage_source": "loop file" if source.endswith(".img") or "/disks/" in source else source,
            "incus": server.get("environment", {}).get("server_version"), "kernel": platform.release(),
            "os": debian, "other_instances": len(instances),
            "other_running": sum(1 for i in instances if i.get("status") == "Running"),
            "load_average": os.getloadavg()[0]}


def machine_line(m: dict[str, Any], python: str, python_version: str) -> str:
    return (f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB memory, "
            f"storage pool {m['storage_pool']}: {m['storage_driver']} ({m['storage_source']}), "
            f"Incus {m['incus']}, kernel {m['kernel']}, {m['os']}, {python} {python_version}; "
            f"other instances on the daemon: {m['other_instances']} ({m['other_running']} running), "
            f"load average {m['load_average']:.2f}")


# ---- set-up ----------------------------------------------------------------------------


def coi_interpreter(coi: str) -> str:
    """The interpreter in coi's launcher (its shebang): the one ``python3 -c pass`` must use."""
    first = Path(coi).resolve().read_bytes()[:300].split(b"\n", 1)[0].decode()
    if not first.startswith("#!"):
        raise BenchError(f"{coi} has no shebang; cannot tell which Python runs coi")
    return shlex.split(first[2:])[0]


def choose_image(args: argparse.Namespace, setup_tmp: Path, coi: str, log) -> tuple[str, str, bool]:
    """(image, agent binary, built here): the tests' sandbox image, else coi, else build one."""
    if args.image:
        binary = SANDBOX_AGENT if args.image in (SANDBOX_IMAGE, BENCH_SANDBOX) else ""
        return args.image, binary, False
    if floor.image_fingerprint(SANDBOX_IMAGE):
        return SANDBOX_IMAGE, SANDBOX_AGENT, False
    if floor.image_fingerprint("coi"):
        return "coi", "", False
    log(f"Neither {SANDBOX_IMAGE} nor coi exists: building {BENCH_SANDBOX} from the tests' recipe "
        "(removed at the end)")
    tests = REPO / "tests" / "images"
    if not (tests / "sandbox.sh").exists():
        raise BenchError(f"no image to run sessions in and no recipe at {tests}: build one with 'coi build'")
    script = setup_tmp / "sandbox.sh"
    agent = (tests / "fake-claude").read_text()
    script.write_text((tests / "sandbox.sh").read_text() + f"\ncat > /usr/local/bin/{SANDBOX_AGENT} <<'COI_AGENT'\n"
                      + agent + f"COI_AGENT\nchmod 0755 /usr/local/bin/{SANDBOX_AGENT}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update({"COI_CONTAINER_PREFIX": PREFIX, "COI_SESSIONS_DIR": str(setup_tmp / "sessions")})
    run([coi, "build", "custom", BENCH_SANDBOX, "--script", str(script), "--base", "bootstrap:debian/bookworm"],
        env=env, timeout=1800).check()
    return BENCH_SANDBOX, SANDBOX_AGENT, True


def dummy_home(home: Path) -> None:
    """A home of the bench's own: a user config that only lists the allowlist's domains
    (a workspace's .coi.toml may not widen network access), and stand-in files where
    the agent's credentials live, so the credential copy does its real work."""
    for rel in (".claude/.credentials.json", ".claude/settings.json", ".claude.json"):
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"coi-bench": "placeholder, not a credential"}\n')
    config = home / ".config" / "coi" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[network]\nallowed_domains = [" + ", ".join(f'"{d}"' for d in ALLOWED_DOMAINS) + "]\n")


# ---- clean-up ----------------------------------------------------------------------------


def bench_instances() -> list[str]:
    return [i["name"] for i in floor.instances() if i["name"].startswith(PREFIX)]


def bench_images() -> list[str]:
    return [a["name"] for img in query("/1.0/images?recursion=1") or [] for a in img.get("aliases") or []
            if a["name"].startswith(PREFIX)]


# What may still run of a run's own (the command line names its temporary directory):
# coi's proxy and network watchers, which coi ends with its sessions, and the proxy case's
# test host, which the case ends.
BENCH_PROCESSES = ("coi.network.proxy", "coi.network.watcher", str(lab.SERVER))
PROCESS_GRACE = 10.0  # seconds they get to end by themselves (coi's proxy ends after SIGTERM)


def stray_processes(under: Path | str) -> list[tuple[int, list[str]]]:
    return [(pid, argv) for pid, argv in bench_processes(under) if any(p in argv for p in BENCH_PROCESSES)]


def end_processes(under: Path | str, log) -> list[str]:
    """End the processes of ``stray_processes`` (after a grace period: coi may have just told
    them to stop); returns those that still run."""
    import time

    deadline = time.monotonic() + PROCESS_GRACE
    while stray_processes(under) and time.monotonic() < deadline:
        time.sleep(0.05)
    strays = stray_processes(under)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in strays:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 2
        while stray_processes(under) and time.monotonic() < deadline:
            time.sleep(0.05)
    if strays:
        log(f"Ended {len(strays)} leftover process(es): "
            + "; ".join(f"{pid} ({' '.join(argv)[:160]})" for pid, argv in strays))
    return [f"process {pid} ({' '.join(argv)[:160]})" for pid, argv in stray_processes(under)]


def leftovers_of_earlier_runs() -> bool:
    earlier = str(Path(tempfile.gettempdir()) / PREFIX)
    return bool(bench_instances() or bench_images() or lab.bench_namespaces() or stray_processes(earlier))


def cleanup(coi: str | None, tmp: Path | None, log) -> list[str]:
    """Remove every coi-bench-* container, image and network namespace, end what still runs
    of the bench's, and remove the temporary directory (once no branch case's spare refill
    writes there); returns what is still there afterwards (nothing, normally). Without
    ``tmp`` (before a run), processes of every earlier run's directory are ended."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not stop the clean-up
    try:
        if coi:
            env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
            env["COI_CONTAINER_PREFIX"] = PREFIX
            if tmp is not None:
                env.update({"HOME": str(tmp / "home"), "COI_SESSIONS_DIR": str(tmp / "sessions")})
            run([coi, "kill", "--all", "--force"], env=env)  # coi's own clean-up for its sessions
        names = bench_instances()
        in_parallel([lambda n=n: floor.delete_quietly(n) for n in names], workers=4)
        for alias in bench_images():
            floor.delete_image(alias)
        namespaces = lab.bench_namespaces()
        for ns in namespaces:
            lab.delete_namespace(ns)
        if namespaces:
            log(f"Removed {len(namespaces)} leftover network namespace(s): {', '.join(namespaces)}")
        held = wait_refills(tmp / "sessions") if tmp is not None else []
        running = end_processes(tmp if tmp is not None else Path(tempfile.gettempdir()) / PREFIX, log)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        left = [f"container {n}" for n in bench_instances()] + [f"image {a}" for a in bench_images()]
        left += [f"network namespace {ns}" for ns in lab.bench_namespaces()] + running
        left += [f"spare refill still running ({lock})" for lock in held]
        if tmp is not None and tmp.exists():
            left.append(f"directory {tmp}")
        if names:
            log(f"Removed {len(names)} leftover container(s)")
        return left
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- rendering --------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0.01:  # connection set-ups: tenths of a millisecond matter
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_series(series: Series | None) -> str:
    if series is None or not series.samples:
        return "—"
    st = series.stats()
    return f"{fmt_time(st['median'])} ({fmt_time(st['min'])}–{fmt_time(st['max'])})"


def table(rows: list[Row]) -> str:
    lines = ["| case | coi command | coi median (min–max) | floor | floor median (min–max) | coi/floor "
             "| target | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        if r.status != "ok":
            met = r.status
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        checks = "".join(f"; {k}: {'yes' if v else 'NO'}" for k, v in r.checks.items())
        lines.append(f"| {r.case} | `{r.coi.command}` | {fmt_series(r.coi)} | "
                     f"{r.floor.command if r.floor else '—'} | {fmt_series(r.floor)} | {ratio} | "
                     f"{r.target.describe()}{checks} | {met} |")
    return "\n".join(lines)


def breakdown_table(title: str, summary: dict[str, Any] | None) -> str:
    if not summary:
        return ""
    phases = summary["phases"]
    order = [p for p in PHASE_ORDER if p in phases] + sorted(set(phases) - set(PHASE_ORDER))
    lines = [f"{title} ({summary['runs']} instrumented run(s), median total {fmt_time(summary['total_median'])})",
             "", "| phase | median | REST requests (time) |", "|---|---|---|"]
    for p in order:
        v = phases[p]
        if v["median"] < 0.0005 and "rest_requests" not in v:
            continue
        rest = f"{v['rest_requests']:g} ({fmt_time(v['rest_seconds'])})" if "rest_requests" in v else ""
        lines.append(f"| {p} | {fmt_time(v['median'])} | {rest} |")
    return "\n".join(lines)


def breakdowns(rows: list[Row]) -> list[tuple[str, dict[str, Any] | None]]:
    titles = {"list_20_text": ("coi list, 20 containers", "breakdown"), "run": ("coi run -- true", "breakdown"),
              "session": ("coi shell --background", "breakdown"),
              "snapshot_restore_running": ("coi snapshot restore (running session)", "breakdown")}
    out = []
    for r in rows:
        if r.key in titles:
            out.append((titles[r.key][0], r.extra.get("breakdown")))
        if r.key == "session":
            out.append(("coi shutdown (graceful stop, save, delete)", r.extra.get("shutdown_breakdown")))
        if r.key.startswith("network_") and r.key != "network_open":
            out.append((r.coi.command, r.extra.get("breakdown")))
        if r.key == "build":
            out.append(("coi build custom (warm-up run)", r.extra.get("breakdown")))
    return out


# ---- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    coi = shutil.which(args.coi or "coi")
    if coi is None:
        log(f"Error: {args.coi or 'coi'} is not an executable (install coi with scripts/install.sh)")
        return 2
    python = coi_interpreter(coi)
    python_version = run([python, "-c", "import platform; print(platform.python_version())"]).check().stdout.strip()
    try:
        info = machine()
    except BenchError as exc:
        log(f"Error: Incus does not answer ({exc}); run 'sudo coi setup'")
        return 2
    line = machine_line(info, python, python_version)
    print(line, flush=True)
    command = shlex.join(["sudo", sys.executable, "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    tmp: Path | None = None
    rows: list[Row] = []
    failures: list[str] = []
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": info, "machine_line": line, "command": command,
                              "repeat": args.repeat, "warmup": args.warmup, "coi": coi,
                              "coi_version": run([coi, "--version"]).stdout.strip(), "git_head": _git_head(),
                              "cases": {}}
    try:
        stale = cleanup(coi, None, log) if leftovers_of_earlier_runs() else []
        if stale:
            raise BenchError(f"cannot remove leftovers of an earlier run: {', '.join(stale)}")
        tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
        os.chmod(tmp, 0o755)
        result["tmp"] = str(tmp)
        dummy_home(tmp / "home")
        image, binary, built = choose_image(args, tmp, coi, log)
        setup = Setup(tmp=tmp, coi=coi, python=python, image=image, binary=binary, build_base=args.build_base,
                      repeat=args.repeat, warmup=args.warmup, branch_files=args.branch_repo_files,
                      branch_mib=args.branch_repo_mb)
        _, _, spec_from = floor.session_spec(image=image, workspace=tmp, slot=1, host_uid=os.getuid(),
                                             host_gid=os.getgid(), shift=False)
        setup.shift = _coi_uses_shift(setup)
        result.update({"image": image, "agent_binary": binary or "(tool default)", "image_built_here": built,
                       "workspace_mount": "shift=true" if setup.shift else
                       f"raw.idmap {os.getuid()}->1000 (coi and floor alike)",
                       "floor_spec_from": spec_from, "user": os.getuid()})
        log(f"Image {image} (agent {binary or 'default'}); workspace mount {result['workspace_mount']}")
        for name in args.cases.split(","):
            log(f"[{name}] running...")
            try:
                case_rows = CASES[name](setup)
                failures += [f"{name}: {r.case}: {r.note}" for r in case_rows if r.status == "failed"]
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                log(f"[{name}] FAILED: {exc}")
                case_rows = [Row(name, name, Series("coi", name), status="failed", note=str(exc))]
            for r in case_rows:
                log(f"[{name}] {r.case}: coi {fmt_series(r.coi)}, floor {fmt_series(r.floor)}"
                    + (f" ({r.note})" if r.note else ""))
            rows += case_rows
    except KeyboardInterrupt:
        failures.append("interrupted")
        log("Interrupted: cleaning up")
    except BenchError as exc:
        failures.append(str(exc))
        log(f"Error: {exc}")
    except Exception:  # noqa: BLE001 - clean up whatever happened, then show it
        failures.append(traceback.format_exc())
        log(traceback.format_exc())
    finally:
        log("Cleaning up coi-bench-* containers and images...")
        left = cleanup(coi, tmp, log)
    print()
    print(table(rows))
    for title, summary in breakdowns(rows):
        text = breakdown_table(title, summary)
        if text:
            print()
            print(text)
    print()
    result["load_average_end"] = os.getloadavg()[0]
    print(f"Load average at the end: {result['load_average_end']:.2f}")
    print("Left behind: " + (", ".join(left) if left else "nothing"))
    result["cases"] = {r.key: r.to_json() for r in rows}
    result["failures"] = failures
    result["left_behind"] = left
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {path}")
    return 1 if failures or left else 0


def _git_head() -> str | None:
    proc = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return proc.stdout.strip() if proc.code == 0 else None


def _coi_uses_shift(setup: Setup) -> bool:
    """Whether coi mounts the workspace with shift=true (it says so with --verbose)."""
    ws = setup.workspace("probe-mount")
    proc = setup.coi_run(["run", "--verbose", "--", "true"], cwd=ws).check()
    return "shift=true" in proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(main())
