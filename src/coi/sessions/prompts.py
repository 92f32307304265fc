"""The prompt of a headless run (``coi run --prompt | --prompt-file | --prompt-name``):
chosen, read and checked before anything exists.

A prompt is text for the agent alone: it reaches the agent as one argument of its
command line (``Tool.headless_command``), never through a shell, and nothing on the
host runs it. It is bounded: one argument of a Linux command line holds at most
128 KiB (MAX_ARG_STRLEN), so coi takes at most ``MAX_BYTES``. A prompt file inside
the workspace is the project's: one that is a link out of the workspace (to
``~/.ssh/id_ed25519``, say) is refused, so that no host file reaches the agent by a
link the project planted.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from coi.errors import CoiError, ConfigError, NotFoundError, UsageError

if TYPE_CHECKING:
    from coi.config import LoadedConfig

MAX_BYTES = 100 * 1024  # under MAX_ARG_STRLEN (128 KiB), with room for a flag glued to it

_FLAGS = ("--prompt", "--prompt-file", "--prompt-name")


@dataclass(frozen=True)
class Prompt:
    """A checked prompt and where it came from, in the user's words."""

    text: str
    source: str  # "" (typed on the command line), "file task.md", "review from /home/me/.config/coi/config.toml"


def choose(*, text: str | None, file: str | None, name: str | None, command: list[str],
           loaded: LoadedConfig, workspace: Path, stdin: IO[bytes] | None = None) -> Prompt | None:
    """The run's prompt, or None when the run is a command. Exactly one of ``text``,
    ``file`` and ``name``, and no ``command`` with it; each is checked (``checked``)."""
    given = [flag for flag, value in zip(_FLAGS, (text, file, name)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other: a run has one prompt",
                         "give one of --prompt TEXT, --prompt-file FILE, --prompt-name NAME")
    if command:
        raise UsageError(f"{given[0]} runs the agent; a command ({command[0]!r}) cannot be given with it",
                         "coi run --prompt TEXT, or coi run -- COMMAND")
    if text is not None:
        return Prompt(checked(text, "the --prompt text"), "")
    if file is not None:
        return Prompt(read_file(file, workspace=workspace, stdin=stdin),
                      "standard input" if file == "-" else f"file {file}")
    assert name is not None
    return named(name, loaded)


def checked(text: str, what: str, error: type[CoiError] = UsageError) -> str:
    """``text`` when it can be one argument of a command line and says something."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise error(f"{what} is not UTF-8 text") from None
    if "\0" in text:
        raise error(f"{what} has a NUL character in it", "no command-line argument can hold one")
    if size > MAX_BYTES:
        raise error(_too_large(what, size), _TOO_LARGE_HINT)
    if not text.strip():
        raise error(f"{what} is empty", "give the agent something to do")
    return text


def named(name: str, loaded: LoadedConfig) -> Prompt:
    """``[prompts] NAME`` of the config; an unknown name lists the known ones."""
    prompts = loaded.config.prompts
    if name not in prompts:
        known = ", ".join(sorted(prompts))
        raise UsageError(f"unknown prompt {name!r}",
                         f"defined prompts: {known}" if known else 'define one in your config: [prompts] NAME = "..."')
    origin = loaded.origins.get(f"prompts.{name}", "the config")
    return Prompt(checked(prompts[name], f"prompt {name} (in {origin})", ConfigError), f"{name} from {origin}")


def read_file(file: str, *, workspace: Path, stdin: IO[bytes] | None = None) -> str:
    """The text of prompt file ``file`` (``-``: standard input), read at most to the limit.

    The file is opened first and what was opened is checked (``_check_inside``), so a link
    swapped in meanwhile is caught too.
    """
    if file == "-":
        return _decoded(_bounded(stdin or sys.stdin.buffer, "the prompt on standard input"),
                        "the prompt on standard input")
    what = f"prompt file {file}"
    path = Path(os.path.abspath(os.path.expanduser(file)))
    try:  # not blocking: a FIFO the project planted cannot hold coi up at the open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"{what} does not exist") from None
    except OSError as exc:
        raise CoiError(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CoiError(f"{what} is a directory, not a file")
        if _named_inside(path, workspace):
            _check_inside(fd, workspace, what)
            if not stat.S_ISREG(st.st_mode):
                raise CoiError(f"{what} is not a regular file", "a prompt file in the project must be a plain file")
        if stat.S_ISREG(st.st_mode) and st.st_size > MAX_BYTES:
            raise CoiError(_too_large(what, st.st_size), _TOO_LARGE_HINT)
        os.set_blocking(fd, True)  # a pipe of the user's own (<(...)) is read as it comes
        with open(fd, "rb", closefd=False) as fh:
            data = _bounded(fh, what)
    finally:
        os.close(fd)
    return _decoded(data, what)


_TOO_LARGE_HINT = "put the material in a file in the workspace and ask the agent to read it"


def _too_large(what: str, size: int | None = None) -> str:
    limit = f"{MAX_BYTES} bytes ({MAX_BYTES // 1024} KiB)"
    if size is None:
        return f"{what} is over {limit}, the most a prompt may have"
    return f"{what} is {size} bytes; a prompt may have at most {limit}"


def _bounded(fh: IO[bytes], what: str) -> bytes:
    """At most ``MAX_BYTES`` from ``fh``; more is refused without reading it all."""
    try:
        data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise CoiError(f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise CoiError(_too_large(what), _TOO_LARGE_HINT)
    return data


def _decoded(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CoiError(f"{what} is not UTF-8 text") from None
    return checked(text, what, CoiError)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _named_inside(path: Path, workspace: Path) -> bool:
    """Whether ``path`` (absolute, links not resolved) names a file of the project; a file
    named outside it is the user's own."""
    return _within(str(path), os.path.abspath(workspace)) or _within(str(path), os.path.realpath(workspace))


def _check_inside(fd: int, workspace: Path, what: str) -> None:
    """A file named inside the workspace must be inside it, links resolved: the file
    that was opened (``fd``) is the one checked."""
    root = os.path.realpath(workspace)
    opened = os.readlink(f"/proc/self/fd/{fd}")
    if not _within(opened, root):
        raise CoiError(f"{what} is a link out of the workspace (to {opened}); coi sends no host file to the "
                       "agent through a link in the project",
                       "if you mean that file, give its own path")
