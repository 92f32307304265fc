"""The argparse tree: flags become keyword arguments of one handler.

``handler`` names ``module:function`` in ``coi.cli.commands``; the module is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator

from coi import version_text
from coi.config import NETWORK_MODES


@contextmanager
def english_messages() -> Iterator[None]:
    """argparse's own words as they are, for the block.

    argparse looks each of its messages up in gettext catalogues, and a failed
    lookup is not cached: ~140 file searches per parser build (20 ms). coi's
    messages are English; the lookups are skipped while coi builds and uses its
    parser, and argparse is left as it was afterwards.
    """
    saved = argparse._, argparse.ngettext  # type: ignore[attr-defined]
    argparse._ = lambda message: message  # type: ignore[attr-defined]
    argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural  # type: ignore[attr-defined]
    try:
        yield
    finally:
        argparse._, argparse.ngettext = saved  # type: ignore[attr-defined]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help in code-on-incus's familiar form: ``Usage:``, ``Flags:``, ``Available Commands:``."""

    def add_usage(self, usage, actions, groups, prefix=None):  # type: ignore[override]
        super().add_usage(usage, actions, groups, prefix="Usage: " if prefix is None else prefix)


COMMANDS_TITLE = "Available Commands"


class _Parser(argparse.ArgumentParser):
    """argparse with coi's help sections and one-line error format (exit code 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = _Formatter
        super().__init__(*args, **kwargs)
        self._optionals.title = "Flags"

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"Error: {message}\nHint: run '{self.prog} --help' for usage\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only print results and errors")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="print more progress detail")
    p.add_argument("--debug-traceback", action="store_true", default=argparse.SUPPRESS,
                   help="show a Python traceback on errors (also COI_DEBUG=1)")


def _workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--workspace", metavar="PATH",
                   help="workspace directory (default: current directory)")


def _command(sub, name: str, handler: str, summary: str, example: str, **kw) -> argparse.ArgumentParser:
    """The parser of one command (or sub-command): its handler, help and example."""
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        **kw,
    )
    p.set_defaults(handler=handler)
    _common(p)
    return p


def _targets(p: argparse.ArgumentParser) -> None:
    """The containers a command acts on: names, or --all after a yes (--force: no question)."""
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every coi container")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")


def _session_flags(p: argparse.ArgumentParser, *, resume: bool = True) -> None:
    """The global session flags of the contract."""
    _workspace(p)
    p.add_argument("--slot", type=int, default=0, metavar="N",
                   help="slot for this session (default: first free; busy N -> next free above N)")
    p.add_argument("--persistent", action="store_true", default=None,
                   help="keep the container after the session (default: [defaults] persistent)")
    if resume:
        p.add_argument("--resume", "--continue", dest="resume", metavar="ID", default=None,
                       help="resume the latest session of this workspace, or --resume=ID")
    p.add_argument("--profile", metavar="NAME", help="apply [profiles.NAME] from config")
    p.add_argument("--image", metavar="NAME", help="image alias (default: [defaults] image, 'coi')")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the agent (repeatable)")
    p.add_argument("--mount", action="append", default=[], metavar="HOST:CONTAINER",
                   help="extra bind mount (repeatable)")
    p.add_argument("--storage", metavar="PATH", nargs="?", const="",
                   help="persistent host directory mounted at /storage "
                        "(alone: a directory of this workspace under [paths] storage_dir)")
    p.add_argument("--network", choices=list(NETWORK_MODES), default=None,
                   help="network mode (default: [network] mode, 'restricted')")


def _branch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--branch", nargs="?", const="", default=None, metavar="NAME",
                   help="work on a copy of the repository on branch coi/NAME (a new copy, or NAME's again; "
                        "no NAME: a generated one; default: [git] isolation)")
    p.add_argument("--carry", action="store_true",
                   help="with a new --branch: bring your uncommitted changes along")


def _forward_flags(p: argparse.ArgumentParser) -> None:
    """What a session reaches through the container's walls: published ports, the SSH agent."""
    p.add_argument("--port", action="append", default=[], metavar="[HOST_PORT:]CONTAINER_PORT",
                   help="publish a TCP port of the container on this host's 127.0.0.1 (repeatable; "
                        "HOST_PORT defaults to CONTAINER_PORT; other addresses: [[ports]] in your config)")
    p.add_argument("--ssh-agent", action=argparse.BooleanOptionalAction, default=None,
                   help="forward your SSH agent ($SSH_AUTH_SOCK) to the agent: ssh and git push work, "
                        "no key enters the container (default: [ssh] forward_agent, off)")


def _duration(text: str) -> str:
    """``--max-duration``'s value, checked as ``[limits] max_duration`` is (exit 2 when bad)."""
    from coi.config.limits import parse_duration
    from coi.errors import UsageError

    try:
        parse_duration(text, key="--max-duration")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(f"{exc.message.split(' = ', 1)[-1]}; {exc.hint}") from None
    return text


def _format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "json"], default="text", help="text or json (default: text)")


def normalise(args: list[str]) -> list[str]:
    """``--resume`` without ``=ID`` means the latest session; an ID needs the ``=``."""
    out = []
    for arg in args:
        if arg == "--":
            out.extend(args[len(out):])
            break
        out.append("--resume=latest" if arg in ("--resume", "--continue") else arg)
    return out


def _shell_command(sub, summary: str) -> None:
    p = _command(sub, "shell", "sessions:shell", summary,
                 "coi shell --persistent --slot 2")
    _session_flags(p)
    _branch_flags(p)
    _forward_flags(p)
    p.add_argument("--background", action="store_true", help="start the session detached and return")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help='with --background, json prints {"container", "session_id", "slot", "workspace", '
                        '"network", "branch", "ports", "ssh_agent"} on stdout (default: text)')
    p.add_argument("--debug", action="store_true", help="start bash instead of the agent")
    p.add_argument("--tmux", dest="tmux", action=argparse.BooleanOptionalAction, default=True,
                   help="run the agent inside tmux (default: on)")
    p.add_argument("--max-duration", metavar="D", default=None, type=_duration,
                   help='stop and save the session after D, such as "2h", "90m" or "30s" ("0": no limit; '
                        "default: [limits] max_duration); a host process keeps the time, also while detached")
    p.add_argument("--generation", type=int, default=1, metavar="N",
                   help="with --resume: which of the session's kept saves to resume, 1 = the newest "
                        "(default), 2 = the one before...; 'coi info' lists them ([sessions] keep)")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)


def _run_command(sub, summary: str) -> None:
    p = _command(sub, "run", "sessions:run", summary,
                 "coi run -- make test\n  coi run --prompt 'Fix the failing test'    # then: coi shell --resume")
    _session_flags(p, resume=False)
    _branch_flags(p)
    _forward_flags(p)
    p.add_argument("--capture", action="store_true",
                   help='print one JSON object {"stdout", "stderr", "exit_code"}')
    p.add_argument("--timeout", type=float, default=0, metavar="S",
                   help="kill the command after S seconds and exit 124 (default: 0 = none)")
    _prompt_flags(p)
    p.add_argument("command", nargs="*", help="the command and its arguments (after --)")


def _prompt_flags(p: argparse.ArgumentParser) -> None:
    """``coi run``'s headless agent: one prompt instead of a command."""
    p.add_argument("--prompt", metavar="TEXT",
                   help="instead of a command, the agent answers TEXT in its own headless mode (claude -p, "
                        "codex exec, ...); the session is saved for 'coi shell --resume'")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="the same, with the prompt read from FILE ('-': standard input; at most 100 KiB)")
    p.add_argument("--prompt-name", metavar="NAME", help="the same, with the prompt NAME of [prompts] in config")


def _attach_command(sub, summary: str) -> None:
    p = _command(sub, "attach", "sessions:attach", summary,
                 "coi attach coi-1a2b3c4d-1")
    _workspace(p)
    p.add_argument("name", nargs="?", help="container name (default: the one running session)")
    p.add_argument("--slot", type=int, default=0, metavar="N", help="slot of this workspace to attach to")
    p.add_argument("--bash", action="store_true", help="open a bash shell instead of the tmux session")


def _list_command(sub, summary: str) -> None:
    p = _command(sub, "list", "sessions:list_sessions", summary,
                 "coi list --format json")
    _workspace(p)
    p.add_argument("--all", action="store_true", help="also list saved sessions")
    _format(p)


def _logs_command(sub, summary: str) -> None:
    p = _command(sub, "logs", "sessions:logs", summary, "coi logs coi-1a2b3c4d-1 --network --follow")
    p.add_argument("name", metavar="NAME", help="container name")
    p.add_argument("--network", dest="network_log", action="store_true",
                   help="the network log: every connection and its verdict (the default, and the only log so far)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    _format(p)


def _info_command(sub, summary: str) -> None:
    p = _command(sub, "info", "sessions:info", summary,
                 "coi info 0b6c...")
    _workspace(p)
    p.add_argument("session_id", nargs="?", metavar="SESSION_ID")


def _shutdown_command(sub, summary: str) -> None:
    p = _command(sub, "shutdown", "sessions:shutdown", summary,
                 "coi shutdown --all --timeout 30")
    _targets(p)
    p.add_argument("--timeout", type=int, default=60, metavar="S", help="graceful stop timeout (default: 60)")


def _kill_command(sub, summary: str) -> None:
    p = _command(sub, "kill", "sessions:kill", summary, "coi kill coi-1a2b3c4d-1")
    _targets(p)


def _persist_command(sub, summary: str) -> None:
    p = _command(sub, "persist", "sessions:persist", summary,
                 "coi persist coi-1a2b3c4d-1")
    _targets(p)


def _clean_command(sub, summary: str) -> None:
    p = _command(sub, "clean", "sessions:clean", summary,
                 "coi clean --sessions")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--sessions", action="store_true", help="also delete saved sessions")
    p.add_argument("--all", action="store_true", help="containers and saved sessions")


def _branch_command(sub, name: str, summary: str, example: str, *, optional: bool = False) -> argparse.ArgumentParser:
    """A branch-session command: -w, the session's NAME (may be left out: the workspace's
    only one), --format text|json."""
    p = _command(sub, name, f"branches:{name}", summary, example)
    _workspace(p)
    p.add_argument("branch_name", metavar="NAME", nargs="?" if optional else None,
                   help="branch session" + (" (default: the workspace's only one)" if optional else ""))
    _format(p)
    return p


def _diff_command(sub, summary: str) -> None:
    p = _branch_command(sub, "diff", summary, "coi diff brave-otter --stat", optional=True)
    p.add_argument("--committed", action="store_true", help="only committed work (what coi merge takes)")
    p.add_argument("--stat", action="store_true", help="a summary of the files instead of the patch")


def _log_command(sub, summary: str) -> None:
    _branch_command(sub, "log", summary, "coi log brave-otter", optional=True)


def _merge_command(sub, summary: str) -> None:
    p = _branch_command(sub, "merge", summary, "coi merge brave-otter --squash")
    p.add_argument("--squash", action="store_true", help="one commit with all of the session's changes")
    p.add_argument("--rebase", action="store_true", help="the session's commits replayed on your branch")


def _discard_command(sub, summary: str) -> None:
    p = _branch_command(sub, "discard", summary, "coi discard brave-otter")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")


SNAPSHOT_DESCRIPTION = """\
A snapshot holds the container's own disk (installed packages, the agent's home and
state, everything outside the mounts), its config and its devices. The workspace and
every other mount (--mount, --storage, a branch session's copy) are host directories:
they are NOT in a snapshot, and a restore does not change them. Snapshots belong to
the container: they are deleted with it (an ephemeral session's when it ends)."""


def _snapshot_target(p: argparse.ArgumentParser) -> None:
    _workspace(p)
    p.add_argument("-c", "--container", metavar="NAME",
                   help="the coi container (default: the workspace's only session container)")


def _snapshot_command(sub, summary: str) -> None:
    p = _command(sub, "snapshot", "snapshots:snapshot_help", summary, "coi snapshot create before-refactor")
    p.description = f"{summary}.\n\n{SNAPSHOT_DESCRIPTION}"
    ssub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    q = _command(ssub, "create", "snapshots:create", "snapshot the container (not /workspace: a host directory)",
                 "coi snapshot create before-refactor --container coi-1a2b3c4d-1")
    q.add_argument("snapshot_name", nargs="?", metavar="NAME",  # a new name: no completion of existing ones
                   help="snapshot name: letters, digits, '.', '_', '-' (default: snap-YYYYMMDD-HHMMSS, UTC)")
    _snapshot_target(q)
    q = _command(ssub, "list", "snapshots:list_snapshots", "list the container's snapshots",
                 "coi snapshot list --format json")
    _snapshot_target(q)
    _format(q)
    q = _command(ssub, "restore", "snapshots:restore",
                 "put the container back to a snapshot (a running one is stopped and started again)",
                 "coi snapshot restore before-refactor")
    q.description += (".\n\nA running container is stopped, restored, and started again with its network\n"
                      "rules; the agent is started again in tmux (Claude Code continues the\n"
                      "conversation the snapshot holds): re-attach with 'coi attach'. Asks first\n"
                      "(--force: no question). /workspace and the other mounts are not changed.")
    q.add_argument("snapshot", metavar="NAME", help="the snapshot to restore")
    _snapshot_target(q)
    q.add_argument("--force", action="store_true", help="do not ask for confirmation")
    q = _command(ssub, "delete", "snapshots:delete", "delete one of the container's snapshots",
                 "coi snapshot delete before-refactor")
    q.add_argument("snapshot", metavar="NAME", help="the snapshot to delete")
    _snapshot_target(q)


def _build_command(sub, summary: str) -> None:
    p = _command(sub, "build", "images:build", summary, "coi build --force")
    p.add_argument("--force", action="store_true", help="replace an existing image")
    p.add_argument("--tools", default=None, metavar="LIST",
                   help="agent tools to install, comma-separated, or 'all' (claude, codex, gemini, opencode, aider; "
                        "default: [build] tools, 'claude')")
    bsub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    q = _command(bsub, "custom", "images:build_custom", "build an image from a script run as root",
                 "coi build custom coi-rust --script rust.sh")
    q.add_argument("name", metavar="NAME", help="alias of the new image")
    q.add_argument("--script", required=True, metavar="FILE", help="shell script to run as root")
    q.add_argument("--base", default=None, metavar="IMAGE", help="image to start from (default: coi)")
    q.add_argument("--force", action="store_true", help="replace an existing image")


def _image_list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every local image")
    p.add_argument("--prefix", default=None, metavar="P", help="only aliases starting with P")
    p.add_argument("--format", choices=["table", "json"], default="table", help="table or json (default: table)")


def _images_command(sub, summary: str) -> None:
    _image_list_flags(_command(sub, "images", "images:image_list", summary, "coi images --all"))


def _image_command(sub, summary: str) -> None:
    p = _command(sub, "image", "images:image_list", summary, "coi image list --format json")
    isub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    _image_list_flags(_command(isub, "list", "images:image_list", "list coi-built images", "coi image list --all"))
    q = _command(isub, "publish", "images:image_publish", "publish a stopped container as an image",
                 "coi image publish coi-1a2b3c4d-1 my-image")
    q.add_argument("container", metavar="CONTAINER")
    q.add_argument("alias", metavar="ALIAS")
    q.add_argument("--description", default="", metavar="D")
    q = _command(isub, "delete", "images:image_delete", "delete an image by alias", "coi image delete my-image")
    q.add_argument("alias", metavar="ALIAS")
    q = _command(isub, "exists", "images:image_exists", "exit 0 when the image exists, 1 when not",
                 "coi image exists coi")
    q.add_argument("alias", metavar="ALIAS")
    q = _command(isub, "cleanup", "images:image_cleanup", "keep only the N newest images with a prefix",
                 "coi image cleanup coi-rust- --keep 2")
    q.add_argument("prefix", metavar="PREFIX")
    q.add_argument("--keep", type=int, required=True, metavar="N", help="how many to keep (N >= 1)")


def _container_command(sub, summary: str) -> None:
    p = _command(sub, "container", "lowlevel:container_help", summary,
                 "coi container exec NAME -- ls")
    csub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    q = _command(csub, "launch", "lowlevel:container_launch", "create and start a container",
                 "coi container launch coi my-box")
    q.add_argument("launch_image", metavar="IMAGE")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--ephemeral", action="store_true", help="Incus deletes it when it stops")
    for action, summary in (("start", "start a container"), ("stop", "stop a container"),
                            ("delete", "delete a container (running ones need --force)")):
        q = _command(csub, action, f"lowlevel:container_{action}", summary, f"coi container {action} my-box")
        q.add_argument("name", metavar="NAME")
        if action != "start":
            q.add_argument("--force", action="store_true", help="force it")
    for action, summary in (("exists", "exit 0 when the container exists, 1 when not"),
                            ("running", "exit 0 when the container runs, 1 when not")):
        q = _command(csub, action, f"lowlevel:container_{action}", summary, f"coi container {action} my-box")
        q.add_argument("name", metavar="NAME")
    q = _command(csub, "exec", "lowlevel:container_exec", "run a command in a container",
                 "coi container exec my-box --capture -- ls /")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--user", type=int, default=None, metavar="UID")
    q.add_argument("--group", type=int, default=None, metavar="GID")
    q.add_argument("--env", action="append", default=[], metavar="K=V")
    q.add_argument("--cwd", default="/workspace", metavar="DIR", help="working directory (default: /workspace)")
    q.add_argument("--capture", action="store_true", help="capture output instead of streaming it")
    q.add_argument("--format", choices=["json", "raw"], default=None,
                   help="with --capture: json or raw (default: json)")
    q.add_argument("command", nargs="*", help="the command and its arguments (after --)")
    q = _command(csub, "mount", "lowlevel:container_mount", "add a disk device to a container",
                 "coi container mount my-box data /srv/data /data")
    for arg in ("name", "device", "source", "path"):
        q.add_argument(arg, metavar=arg.upper())
    q.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                   help="idmapped mount so files keep their owners (default: on)")


def _file_command(sub, summary: str) -> None:
    p = _command(sub, "file", "lowlevel:file_help", summary,
                 "coi file push -r ./dir my-box:/tmp/dir")
    fsub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    for action, a, b in (("push", "local", "remote"), ("pull", "remote", "local")):
        q = _command(fsub, action, f"lowlevel:file_{action}", f"copy a file {'into' if action == 'push' else 'out of'} a container",
                     f"coi file {action} -r " + ("./dir my-box:/tmp/dir" if action == "push" else "my-box:/tmp/dir ./dir"))
        q.add_argument("-r", "--recursive", action="store_true", help="copy directories")
        q.add_argument("source", metavar=a.upper() if a == "local" else "NAME:/PATH")
        q.add_argument("target", metavar=b.upper() if b == "local" else "NAME:/PATH")


def _tmux_command(sub, summary: str) -> None:
    p = _command(sub, "tmux", "lowlevel:tmux_list", summary,
                 "coi tmux capture coi-1a2b3c4d-1")
    tsub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    _command(tsub, "list", "lowlevel:tmux_list", "list coi tmux sessions", "coi tmux list")
    q = _command(tsub, "send", "lowlevel:tmux_send", "type TEXT and Enter into a session",
                 "coi tmux send coi-1a2b3c4d-1 'hello'")
    q.add_argument("name", metavar="NAME")
    q.add_argument("text", metavar="TEXT")
    q = _command(tsub, "capture", "lowlevel:tmux_capture", "print a session's pane", "coi tmux capture NAME")
    q.add_argument("name", metavar="NAME")


def _version_command(sub, summary: str) -> None:
    _command(sub, "version", "host:version", summary, "coi version")


def _completion_command(sub, summary: str) -> None:
    p = _command(sub, "completion", "host:completion", summary,
                 'eval "$(coi completion bash)"    # or: coi completion fish | source')
    p.add_argument("shell", choices=["bash", "zsh", "fish"], metavar="SHELL", help="bash, zsh or fish")


def _setup_command(sub, summary: str) -> None:
    p = _command(sub, "setup", "host:setup", summary,
                 "sudo coi setup")
    p.add_argument("--ipv6", action="store_true", help="give the coi bridge IPv6 too (default: off)")
    p.add_argument("--user", metavar="NAME",
                   help="user to add to the Incus admin group (default: $SUDO_USER)")


def _doctor_command(sub, summary: str) -> None:
    p = _command(sub, "doctor", "host:doctor", summary,
                 "coi doctor --fix        # then 'sudo coi doctor --fix' for what needs root")
    p.epilog = ("exit status: 0 all good, 1 warnings, 2 errors (after the fixes, with --fix)\n\n" + p.epilog)
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    p.add_argument("--fix", action="store_true",
                   help="repair what is safe to repair (a stopped daemon, coi's profile, bridge or pool, "
                        "the address lock, orphaned network rules...), say what was done, then check again")


def _config_command(sub, summary: str) -> None:
    p = _command(sub, "config", "config:show", summary,
                 "coi config show --format json")
    csub = p.add_subparsers(title=COMMANDS_TITLE, metavar="ACTION", parser_class=_Parser)
    q = _command(csub, "show", "config:show",
                 "print the effective configuration and where each value came from",
                 "coi config show --format toml")
    _workspace(q)
    q.add_argument("--format", choices=["toml", "json"], default="toml", help="output format (default: toml)")
    q = _command(csub, "path", "config:path", "list the configuration files consulted", "coi config path")
    _workspace(q)


# Every command: its one-line summary and what builds its parser, in --help order.
COMMANDS = {
    "shell": ("start an agent session in a container (tmux inside)", _shell_command),
    "run": ("run one command (or the agent on one prompt) as 'code' in /workspace of a fresh container",
            _run_command),
    "attach": ("attach to a running session", _attach_command),
    "list": ("list coi containers (and saved sessions with --all)", _list_command),
    "info": ("show a saved session (default: latest of this workspace)", _info_command),
    "logs": ("show a session's network log (allowlist by name)", _logs_command),
    "shutdown": ("stop sessions gracefully, save them, delete ephemeral ones", _shutdown_command),
    "kill": ("force-stop and delete containers now", _kill_command),
    "persist": ("turn ephemeral containers persistent", _persist_command),
    "clean": ("delete stopped ephemeral containers and leftovers", _clean_command),
    "diff": ("show a branch session's work against its base", _diff_command),
    "log": ("list a branch session's commits", _log_command),
    "merge": ("merge a branch session's commits into your current branch", _merge_command),
    "discard": ("delete a branch session's copy and its branch", _discard_command),
    "snapshot": ("snapshot a session's container, and restore or delete snapshots", _snapshot_command),
    "build": ("build the coi image", _build_command),
    "images": ("list coi images (the same as 'coi image list')", _images_command),
    "image": ("list and manage coi images", _image_command),
    "container": ("low-level container operations", _container_command),
    "file": ("copy files into and out of containers", _file_command),
    "tmux": ("talk to the tmux sessions of running containers", _tmux_command),
    "version": ("print the version", _version_command),
    "completion": ("print a shell completion script", _completion_command),
    "setup": ("make this host ready for coi (run as root; safe to repeat)", _setup_command),
    "doctor": ("check that this host can run coi, with a fix for each problem", _doctor_command),
    "config": ("show the effective configuration", _config_command),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole tree, or with ``only`` just that command's sub-parser in full
    (the others are listed by name: building them all costs more than running ``coi list``)."""
    parser = _Parser(
        prog="coi",
        description="code-on-incus (coi): run AI coding agents inside isolated Incus system containers.",
        epilog=(
            "commands by group:\n"
            "  sessions:  shell, run, attach, list, info, logs, shutdown, kill, persist, clean\n"
            "  branches:  diff, log, merge, discard\n"
            "  snapshots: snapshot create|list|restore|delete\n"
            "  images:    build, image, images\n"
            "  low-level: container, file, tmux\n"
            "  host:      setup, doctor, config, completion, version\n\n"
            "example:\n  coi shell            # Claude Code in a container, on the current directory"
        ),
    )
    parser.add_argument("-v", "--version", action="version", version=version_text())
    _common(parser)
    sub = parser.add_subparsers(title=COMMANDS_TITLE, metavar="COMMAND", parser_class=_Parser)
    for name, (summary, build) in COMMANDS.items():
        if only in (None, name):
            build(sub, summary)
        else:
            sub.add_parser(name, help=summary)  # listed, but its flags are not built
    if only in (None, "__complete"):
        p = sub.add_parser("__complete")  # for the completion scripts; not listed
        p.set_defaults(handler="host:complete")
        p.add_argument("what", choices=["containers", "sessions", "branches", "snapshots", "prompts"])
    return parser
