"""Agent tools: one small definition per tool (executable, state directory,
credentials, how to start fresh and how to resume)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    name: str
    executable: str
    state_dir: str  # relative to the agent's home
    credential_files: tuple[str, ...] = ()  # relative to the host home
    env_vars: tuple[str, ...] = ()  # variables the tool authenticates with
    session_flag: str | None = None  # flag that sets the tool's own session id
    resume_flag: str | None = None  # flag that resumes a given session id
    continue_flag: str | None = None  # flag that resumes the latest session

    def command(self, *, binary: str = "", session_id: str | None = None,
                resume_id: str | None = None, resume_latest: bool = False) -> list[str]:
        """argv that starts the tool fresh, or in its own resume mode."""
        argv = [binary or self.executable]
        if resume_id and self.resume_flag:
            return argv + [self.resume_flag, resume_id]
        if (resume_id or resume_latest) and self.continue_flag:
            return argv + [self.continue_flag]
        if session_id and self.session_flag:
            return argv + [self.session_flag, session_id]
        return argv

    def find_session_id(self, state: Path) -> str | None:
        """The tool's own id of its latest conversation in a saved state dir."""
        if self.name != "claude":
            return None
        transcripts = sorted((state / "projects").glob("*/*.jsonl"), key=lambda p: p.stat().st_mtime)
        return transcripts[-1].stem if transcripts else None


TOOLS: dict[str, Tool] = {
    "claude": Tool("claude", "claude", ".claude",
                   credential_files=(".claude/.credentials.json", ".claude/settings.json", ".claude.json"),
                   session_flag="--session-id", resume_flag="--resume", continue_flag="--continue"),
    "aider": Tool("aider", "aider", ".aider", env_vars=("OPENAI_API_KEY", "ANTHROPIC_API_KEY")),
    "codex": Tool("codex", "codex", ".codex", env_vars=("OPENAI_API_KEY",)),
    "gemini": Tool("gemini", "gemini", ".gemini", env_vars=("GEMINI_API_KEY", "GOOGLE_API_KEY")),
    "opencode": Tool("opencode", "opencode", ".local/share/opencode",
                     env_vars=("ANTHROPIC_API_KEY", "OPENAI_API_KEY")),
}


def get_tool(name: str) -> Tool:
    return TOOLS[name]


def host_home() -> Path:
    return Path(os.path.expanduser("~"))
