"""What ``coi setup`` lets a coi user do as root, and nothing more: run coi's nft helper
through ``sudo -n`` with no arguments.

It writes the helper's launcher (only after checking that only root can change what the
launcher runs), the user's sudoers grant, the bridge gate and the systemd drop-in that
loads the gate before Incus starts containers. The texts are pure functions, table-tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable, Iterable

from coi.config import SYSTEM_FILE
from coi.errors import CoiError
from coi.host.steps import RUN_SETUP, Report, Step, apt, run, systemd_runs

SUDOERS_DIR = Path("/etc/sudoers.d")
# On systemd hosts the gate must exist before Incus autostarts containers after a reboot.
INCUS_DROPIN = Path("/etc/systemd/system/incus.service.d/coi-gate.conf")
# The module the launcher runs (coi.network.helper: main, execute, HelperError).
HELPER_MODULE = "coi.network.helper"
# What earlier coi versions wrote to /etc/sudoers.d/coi-nft-NAME: nft with any arguments.
_LEGACY_GRANT = re.compile(r"(\S+) ALL=\(root\) NOPASSWD: (/\S*/nft)\n?")


def helper_path() -> Path:
    """Where the launcher is installed (``coi.network.HELPER``)."""
    from coi.network import HELPER

    return Path(HELPER)


# ---- pure texts and checks (table-tested) ----------------------------------------

def launcher_text(interpreter: str, import_root: str) -> str:
    """The helper's launcher: isolated Python (``-I``: no PYTHON* variables, user site or
    script directory), importing coi from the directory that was checked at install."""
    if not interpreter.startswith("/") or any(c.isspace() for c in interpreter) or len(interpreter) > 200:
        raise CoiError(f"cannot name the interpreter {interpreter!r} in a #! line")
    return (f"#!{interpreter} -I\n"
            f"# coi's privileged nftables helper, written by 'coi setup' (see {HELPER_MODULE}).\n"
            "import sys\n"
            f"sys.path.insert(0, {import_root!r})\n"
            f"from {HELPER_MODULE} import main\n"
            "sys.exit(main())\n")


def sudoers_rule(uid: int, helper: str) -> str:
    """The user (by uid) may run the helper as root with no arguments (``""``), nothing else."""
    return f'#{int(uid)} ALL=(root) NOPASSWD: {helper} ""\n'


def grant_path(uid: int, sudoers_dir: Path = SUDOERS_DIR) -> Path:
    """No '.' in the name: sudo ignores such files in /etc/sudoers.d (user names may have one)."""
    return sudoers_dir / f"coi-{int(uid)}"


def dropin_text(helper: str) -> str:
    """incus.service's drop-in: load the gate before the daemon starts."""
    return ("# Written by coi setup: load coi's bridge gate before Incus starts containers.\n"
            f"[Service]\nExecStartPre={helper} --gate\n")


def legacy_grant_user(text: str) -> str | None:
    """The user of an unlimited ``sudo nft`` grant an earlier coi wrote, else None."""
    match = _LEGACY_GRANT.fullmatch(text)
    return match[1] if match else None


def path_problem(path: Path, st: os.stat_result) -> str | None:
    """Why someone but root could change ``path`` (from its ``lstat``), or None.

    A root-owned directory writable by others is fine only with the sticky bit (/tmp).
    """
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if (st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)
            and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)):
        return f"{path} is writable by group or others"
    return None


def untrusted_paths(paths: Iterable[Path]) -> list[str]:
    """Each path (or parent directory) that someone but root could change, with why."""
    problems: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        for p in (path, *path.parents):
            if p in seen:
                continue
            seen.add(p)
            try:
                problem = path_problem(p, os.lstat(p))
            except FileNotFoundError:
                problem = f"{p} is missing"
            if problem:
                problems.append(problem)
    return problems


def helper_inputs(interpreter: Path, package: Path) -> list[Path]:
    """What the launcher runs as root: the interpreter (link and target), its venv config,
    every file of the coi package, and the .pth files Python runs from beside it."""
    paths = [interpreter, interpreter.resolve()]
    cfg = interpreter.parent.parent / "pyvenv.cfg"
    if cfg.exists():
        paths.append(cfg)
    paths.append(package)
    for root, dirs, files in os.walk(package):
        paths += [Path(root) / n for n in (*dirs, *files)]
    paths += sorted(package.parent.glob("*.pth"))
    return paths


# ---- root-owned files ----------------------------------------------------------------

def _in_place(path: Path, text: str, mode: int, *, gid: int | None = None) -> bool:
    """Whether ``path`` already is a regular file of root's (and group ``gid``) with
    ``mode`` and ``text``."""
    try:
        st = os.lstat(path)
        return (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and (gid is None or st.st_gid == gid)
                and st.st_mode & 0o7777 == mode and path.read_text() == text)
    except FileNotFoundError:
        return False


def _write_root_file(path: Path, text: str, mode: int, *, tmp: Path | None = None,
                     check: Callable[[Path], None] | None = None) -> None:
    """root:root ``mode``, written to ``tmp`` (checked), then renamed into place atomically."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- the steps -------------------------------------------------------------------------

def install_helper(report: Report, *, path: Path | None = None, interpreter: str | None = None,
                   package: Path | None = None) -> Path:
    """Write the helper's launcher (root:root 0755), after checking that only root can
    change what it runs: a user-writable coi would make the sudoers grant a root shell."""
    import coi

    path = path or helper_path()
    interp = Path(interpreter or sys.executable)
    package = package or Path(coi.__file__).resolve().parent
    text = launcher_text(str(interp), str(package.parent))
    problems = untrusted_paths(helper_inputs(interp, package))
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    problems += untrusted_paths([path.parent])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CoiError(f"refusing to install {path}: {problems[0]}{more}",
                       "install coi where only root can change it (e.g. sudo python3 -m venv /opt/coi; "
                       "sudo /opt/coi/bin/pip install coi), then run 'sudo coi setup' again")
    if _in_place(path, text, 0o755, gid=0):
        report(Step("helper", False, f"{path} is installed"))
        return path
    _write_root_file(path, text, 0o755)
    report(Step("helper", True, f"installed {path} (coi's nft helper; runs {interp} -I)"))
    return path


def install_grant(uid: int, helper: Path, *, sudoers_dir: Path = SUDOERS_DIR) -> tuple[Path, bool]:
    """``/etc/sudoers.d/coi-<uid>``: validated with ``visudo -cf`` under a name sudo ignores
    (it has a '.'), chmod 0440, then renamed into place. Returns (path, changed)."""
    target, rule = grant_path(uid, sudoers_dir), sudoers_rule(uid, str(helper))
    if _in_place(target, rule, 0o440):
        return target, False

    def valid(tmp: Path) -> None:
        proc = run(["visudo", "-cf", str(tmp)], capture_output=True)
        if proc.returncode != 0:
            raise CoiError(f"visudo refused the sudoers rule for uid {uid}", "check sudo's installation")

    _write_root_file(target, rule, 0o440, tmp=sudoers_dir / f".coi-{int(uid)}.tmp", check=valid)
    return target, True


def remove_legacy_grants(report: Report, *, sudoers_dir: Path = SUDOERS_DIR, helper: Path | None = None) -> None:
    """Replace the unlimited ``sudo nft`` grants earlier versions wrote (``coi-nft-NAME``)
    with the helper's grant for the same user, and delete them."""
    import pwd

    helper = helper or helper_path()
    for old in sorted(sudoers_dir.glob("coi-nft-*")):
        try:
            user = legacy_grant_user(old.read_text())
        except (OSError, UnicodeDecodeError):
            user = None
        if user is None:
            report(Step("isolation", False, f"left {old} alone (not a grant coi wrote); check what it allows"))
            continue
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            uid = None
        if uid is not None and helper.is_file():
            install_grant(uid, helper, sudoers_dir=sudoers_dir)
        old.unlink()
        report(Step("isolation", True, f"removed the unlimited nft grant {old}"
                    + (f" ({user} may run {helper} instead)" if uid is not None else "")))


def ensure_gate(report: Report, *, helper: Path | None = None, dropin: Path = INCUS_DROPIN,
                systemd: bool | None = None) -> None:
    """Load the bridge gate (containers coi has not opened get no network), and on systemd
    hosts make incus.service load it before the daemon starts (and autostarts containers)."""
    from coi.network import helper as nft_helper

    helper = helper or helper_path()
    try:
        loaded = json.loads(nft_helper.execute({"action": "list"})).get("gate")
        if not loaded:
            nft_helper.execute({"action": "gate"})
    except nft_helper.HelperError as exc:
        raise CoiError(f"could not load coi's bridge gate: {exc.message}",
                       "check that nftables works here ('nft list tables')") from None
    report(Step("gate", not loaded, "bridge gate loaded" if not loaded else "bridge gate is loaded"))
    if not (systemd_runs() if systemd is None else systemd):
        return
    text = dropin_text(str(helper))
    if dropin.is_file() and dropin.read_text() == text:
        report(Step("gate", False, f"{dropin} loads it before Incus starts"))
        return
    dropin.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_root_file(dropin, text, 0o644)
    run(["systemctl", "daemon-reload"], capture_output=True)
    report(Step("gate", True, f"wrote {dropin}: the gate is loaded before Incus starts containers"))


def ensure_network_privileges(user: str | None, report: Report, *, helper: Path | None = None,
                              sudoers_dir: Path = SUDOERS_DIR, system_config: Path = SYSTEM_FILE) -> None:
    """Let ``user`` run coi's nft helper (and nothing else) through ``sudo -n``, and tell
    coi to do so (``[network] privileged_command``). Needed on every kernel: host nftables
    filter where Incus ACLs cannot, and the bridge gate is opened through the helper."""
    if not user or user == "root":
        return
    import pwd

    helper = helper or helper_path()
    if shutil.which("sudo") is None:
        apt(["install", "--no-install-recommends", "sudo"], "installing sudo")
    if not helper.is_file():
        raise CoiError(f"coi's nft helper {helper} is not installed", RUN_SETUP)
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise CoiError(f"no user {user!r} on this host") from None
    sudoers, changed = install_grant(uid, helper, sudoers_dir=sudoers_dir)
    if changed:
        report(Step("isolation", True, f"{user} may run {helper} through sudo -n ({sudoers}), nothing else"))
    legacy = sudoers_dir / f"coi-nft-{user}"
    if legacy.is_file() and legacy_grant_user(legacy.read_text()) is not None:
        legacy.unlink()
        changed = True
        report(Step("isolation", True, f"removed the unlimited nft grant {legacy}"))
    if not system_config.exists():
        system_config.parent.mkdir(parents=True, exist_ok=True)
        system_config.write_text('# Written by coi setup: how coi runs its nft helper for network isolation.\n'
                                 '[network]\nprivileged_command = ["sudo", "-n"]\n')
        changed = True
        report(Step("isolation", True, f"set [network] privileged_command in {system_config}"))
    elif "privileged_command" not in system_config.read_text():
        report(Step("isolation", False, f"add privileged_command = [\"sudo\", \"-n\"] to [network] in "
                                        f"{system_config} for isolated sessions"))
    if not changed:
        report(Step("isolation", False, f"{user} may run {helper} through sudo -n"))
