"""The agent's tmux session inside the container: start it, ask whether it runs,
and the command line that attaches a terminal to it."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Mapping

from coi import naming
from coi.errors import CoiError, CommandNotFoundError
from coi.sessions.commands import as_user, exec_code
from coi.sessions.spec import CODE_HOME, TMUX_SOCKET, WORKSPACE, terminal_type, tmux_env

if TYPE_CHECKING:
    from coi.incus import IncusClient

def tmux_argv(*args: str) -> list[str]:
    return ["tmux", "-S", TMUX_SOCKET, *args]


def agent_shell_command(agent: list[str] | None) -> list[str]:
    """bash runs the agent, then stays as the user's shell when the agent exits."""
    if agent is None:
        return ["bash", "-l"]
    return ["bash", "-l", "-c", f"{shlex.join(agent)}; exec bash -l"]


def has_tmux_session(client: IncusClient, name: str, code_uid: int) -> bool:
    result = exec_code(client, name, tmux_argv("has-session", "-t", naming.tmux_session(name)),
                       code_uid=code_uid, cwd=CODE_HOME, capture=False)
    return result.exit_code == 0


def start_tmux(client: IncusClient, name: str, *, code_uid: int, env: Mapping[str, str],
               command: list[str]) -> None:
    """Create the detached tmux session ``coi-<container>`` running ``command``."""
    argv = tmux_argv("new-session", "-d", "-s", naming.tmux_session(name), "-c", WORKSPACE,
                     "-x", "200", "-y", "50")
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    hint = "the image needs tmux and a user 'code' (coi build)"
    try:
        result = exec_code(client, name, [*argv, *command], code_uid=code_uid, capture=False)
        # A failure may still have made the session (an exec Incus lost track of and
        # ran again): then it is there. Otherwise run it again to read why; this
        # keeps the usual case at 2 requests instead of 6.
        if result.exit_code != 0 and not has_tmux_session(client, name, code_uid):
            result = exec_code(client, name, [*argv, *command], code_uid=code_uid)
    except CommandNotFoundError:  # setpriv (util-linux) itself is missing
        raise CoiError(f"could not start tmux in {name}: the image has no setpriv (util-linux)", hint) from None
    if result.exit_code != 0 and not has_tmux_session(client, name, code_uid):
        why = result.stderr.strip() or result.stdout.strip()
        if why.startswith("setpriv: uid") and "not found" in why:
            why = f"the image has no user with uid {code_uid} (code)"
        elif "failed to execute tmux" in why:
            why = "the image has no tmux"
        raise CoiError(f"could not start tmux in {name}: {why}", hint)


def attach_argv(client: IncusClient, name: str, *, code_uid: int, term: str | None, bash: bool = False) -> list[str]:
    env = {**tmux_env(), "TERM": terminal_type(term)}
    command = ["bash", "-l"] if bash else tmux_argv("attach-session", "-t", naming.tmux_session(name))
    return client.exec_argv(name, as_user(command, uid=code_uid), cwd=WORKSPACE, env=env,
                            terminal=True)
