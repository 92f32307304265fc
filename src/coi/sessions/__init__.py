"""Sessions: a container for one workspace and slot, the agent in tmux inside, and what
happens when the session ends.

Owns: the session's spec (``spec``: pure), its container (``containers``), commands in
it (``commands``: the one exec policy), the agent's tmux session (``tmux``), signal
handling around daemon work (``signals``), the saved state on the host (``state``)
and the start and end of a session as a whole (``lifecycle``).

Must not: print (it reports through the ``Messages``/``Log`` it is given), build an
Incus client (it gets one), import ``coi.cli``, or trust anything the workspace or
the container wrote without checking it.
"""

from coi.sessions.commands import (as_user, checked_stderr, env_file_text, env_via_file, exec_code, guard_lines,
                                   lost_track, once_argv, run_attached, run_streamed)
from coi.sessions.containers import (cleanup_on_interrupt, coi_container, create_container, create_pinned,
                                     ensure_running, launch_container, list_containers, open_session,
                                     remove_container, wait_stopped, workspace_lock)
from coi.sessions.signals import deferred_signals, interruptible, signals_ignored
from coi.sessions.spec import (CODE_HOME, CONTAINER_CONFIG, KEY, STORAGE, WORKSPACE, ContainerInfo, Session,
                               SessionRequest, agent_environment, check_mount_sources, check_mounts, choose_slot,
                               container_spec, is_coi, is_stopped, limits_config, new_session_id, parse_env,
                               parse_mount, terminal_type, tmux_env, to_info)
from coi.sessions.tmux import agent_shell_command, attach_argv, has_tmux_session, start_tmux, tmux_argv

__all__ = [
    "CODE_HOME", "CONTAINER_CONFIG", "KEY", "STORAGE", "WORKSPACE", "ContainerInfo", "Session", "SessionRequest",
    "agent_environment", "agent_shell_command", "as_user", "attach_argv", "check_mount_sources", "check_mounts",
    "checked_stderr", "choose_slot", "cleanup_on_interrupt", "coi_container", "container_spec", "create_container",
    "create_pinned", "deferred_signals", "ensure_running", "env_file_text", "env_via_file", "exec_code",
    "guard_lines", "has_tmux_session", "interruptible", "is_coi", "is_stopped", "launch_container",
    "limits_config", "list_containers", "lost_track", "new_session_id", "once_argv", "open_session", "parse_env",
    "parse_mount", "remove_container", "run_attached", "run_streamed", "signals_ignored", "start_tmux",
    "terminal_type", "tmux_argv", "tmux_env", "to_info", "wait_stopped", "workspace_lock",
]
