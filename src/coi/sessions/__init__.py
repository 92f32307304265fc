"""Sessions: a container for one workspace and slot, the agent in tmux inside, and what
happens when the session ends.

Owns: the session's spec (``spec``: pure), its container (``containers``), commands in
it (``commands``: the one exec policy), the agent's tmux session (``tmux``), signal
handling around daemon work (``signals``), the masks over the workspace's secret files (``masks``),
published ports and the SSH agent
(``forwards``: proxy devices), the saved state on the host (``state``), the start
and end of a session as a whole (``lifecycle``), snapshots of its container
(``snapshots``), the prompt of a headless run, checked before anything exists
(``prompts``), and the session timer that keeps ``[limits] max_duration`` from the
host (``timer``: a detached process of its own, ``python -I -m coi.sessions.timer``;
the package never imports it at its top).

Must not: print (it reports through the ``Messages``/``Log`` it is given), build an
Incus client (it gets one; only the timer process makes one from the environment),
import ``coi.cli``, or trust anything the workspace or the container wrote without
checking it.
"""

import importlib
from typing import Any

# What the package offers at its top, and the module each name lives in. Imported on
# first use, so that ``coi list`` loads only the modules it needs.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys([
        "as_user", "checked_stderr", "env_file_text", "env_via_file", "exec_code", "guard_lines",
        "lost_track", "once_argv", "run_attached", "run_streamed"], "commands"),
    **dict.fromkeys([
        "cleanup_on_interrupt", "coi_container", "create_container", "create_pinned", "ensure_running",
        "launch_container", "list_containers", "open_session", "remove_container", "wait_stopped",
        "workspace_lock"], "containers"),
    **dict.fromkeys([
        "deferred_signals", "interruptible", "signals_ignored"], "signals"),
    **dict.fromkeys([
        "CODE_HOME", "CONTAINER_CONFIG", "ContainerInfo", "KEY", "STORAGE", "Session", "SessionRequest",
        "WORKSPACE", "agent_environment", "check_mount_sources", "check_mounts", "choose_slot",
        "container_spec", "is_coi", "is_stopped", "limits_config", "new_session_id", "parse_env",
        "parse_mount", "terminal_type", "tmux_env", "to_info"], "spec"),
    **dict.fromkeys([
        "agent_shell_command", "attach_argv", "has_tmux_session", "start_tmux", "tmux_argv"], "tmux"),
}
__all__ = sorted(_EXPORTS)


_MODULES = ("commands", "containers", "forwards", "lifecycle", "manage", "masks", "prompts", "signals",
            "snapshots", "spec", "state", "timer", "tmux")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"coi.sessions.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coi.sessions' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"coi.sessions.{module}"), name)
    globals()[name] = value
    return value
