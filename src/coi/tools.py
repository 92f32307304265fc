"""Agent tools: one small definition per tool (executable, state directory,
credentials, how to start fresh, how to resume, and how to answer one prompt headless)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class Tool:
    name: str
    executable: str
    state_dir: str  # relative to the agent's home
    package: tuple[str, str] = ("npm", "")  # where the coi image installs it from: (registry, package)
    credential_files: tuple[str, ...] = ()  # relative to the home, on the host and inside
    env_vars: tuple[str, ...] = ()  # variables the tool authenticates with
    session_flag: str | None = None  # flag that sets the tool's own session id
    resume_flag: str | None = None  # flag that resumes a given session id
    continue_flag: str | None = None  # flag that resumes the latest session
    # JSON files (relative to the home) and the settings merged into them so the
    # agent runs without permission prompts inside the sandbox.
    sandbox_settings: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    # Host JSON files (relative to the home) of which only these top-level keys
    # are copied, unless the user opts in with [tool] full_host_config.
    kept_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Other files (relative to the home) the tool reads its first-run answers from
    # (trust, telemetry, updates), written when coi copies nothing there itself.
    seed_files: tuple[tuple[str, bytes], ...] = ()
    # Shell run before the agent (``$0``: its binary) that signs it in, the way the tool
    # documents, with a key it was given (-e); and the files that login is kept in
    # (relative to the home), which are never saved with the session.
    sign_in: str = ""
    login_files: tuple[str, ...] = ()
    # Headless mode (``coi run --prompt``), as each tool documents it: the words after the
    # binary (and its session flag) that make it answer one prompt and exit, and how the
    # prompt follows them: glued to ``prompt_flag`` ("--message=TEXT") or, without one, as
    # the single argument after "--" (so a prompt starting with "-" is no option).
    headless: tuple[str, ...] = ()
    prompt_flag: str = ""

    def credentials(self, host_home: Path, *, full_host_config: bool = False) -> dict[str, bytes]:
        """What to write into the agent's home: only the essential files, with
        the sandbox settings merged in (the user's own settings are kept)."""
        files: dict[str, bytes] = {}
        for rel in self.credential_files:
            path = host_home / rel
            if path.is_file() and not path.is_symlink():
                files[rel] = path.read_bytes()
        for rel, keys in () if full_host_config else self.kept_keys:
            if rel in files:
                host = _json_object(files[rel])
                files[rel] = _json_bytes({key: host[key] for key in keys if key in host})
        for rel, settings in self.sandbox_settings:
            files[rel] = _json_bytes(merge_settings(_json_object(files.get(rel, b"{}")), settings))
        for rel, content in self.seed_files:
            files.setdefault(rel, content)
        return files

    def command(self, *, binary: str = "", session_id: str | None = None,
                resume_id: str | None = None, resume_latest: bool = False) -> list[str]:
        """argv that starts the tool fresh, or in its own resume mode."""
        argv = [binary or self.executable]
        if resume_id and self.resume_flag:
            argv += [self.resume_flag, resume_id]
        elif (resume_id or resume_latest) and self.continue_flag:
            argv += [self.continue_flag]
        elif session_id and self.session_flag:
            argv += [self.session_flag, session_id]
        return self._signed_in(argv)

    @property
    def has_headless(self) -> bool:
        return bool(self.headless or self.prompt_flag)

    def headless_command(self, prompt: str, *, binary: str = "", session_id: str | None = None) -> list[str]:
        """argv that answers ``prompt`` in the tool's own headless mode, then exits.

        The prompt is one argument of its own, never part of a shell string: the shell
        that signs a tool in gets it as ``"$@"``, which no shell reads as code.
        """
        if not self.has_headless:
            from coi.errors import UsageError

            raise UsageError(f"{self.name} has no headless mode coi knows", "run it with: coi shell")
        argv = [binary or self.executable]
        if session_id and self.session_flag:
            argv += [self.session_flag, session_id]
        argv += [*self.headless, *([self.prompt_flag + prompt] if self.prompt_flag else ["--", prompt])]
        return self._signed_in(argv)

    def _signed_in(self, argv: list[str]) -> list[str]:
        """``argv`` behind the tool's sign-in (``sign_in``), when it has one."""
        if self.sign_in:
            return ["sh", "-c", f'{self.sign_in}; exec "$0" "$@"', *argv]
        return argv

    def unsaved_files(self) -> list[str]:
        """Files of the state dir (relative to it) a save leaves out: credentials and logins."""
        prefix = self.state_dir + "/"
        return [rel[len(prefix):] for rel in self.credential_files + self.login_files if rel.startswith(prefix)]

    def resume_command(self, state: Path, *, binary: str = "", session_id: str | None = None) -> list[str]:
        """argv that resumes the conversation saved in ``state``. Claude Code's own id is read
        from its transcripts; with none (the agent never talked: not logged in, say) it starts
        fresh, since ``--continue`` would only say "No conversation found" and exit."""
        agent_id = self.find_session_id(state)
        if self.name == "claude" and agent_id is None:
            return self.command(binary=binary, session_id=session_id)
        return self.command(binary=binary, resume_id=agent_id, resume_latest=agent_id is None)

    def find_session_id(self, state: Path) -> str | None:
        """The tool's own id of its latest conversation in a saved state dir."""
        if self.name != "claude":
            return None
        transcripts = sorted((state / "projects").glob("*/*.jsonl"), key=lambda p: p.stat().st_mtime)
        return transcripts[-1].stem if transcripts else None


def _json_object(data: bytes) -> dict[str, Any]:
    """A JSON object, or {} for anything else (bad JSON, a list, a number)."""
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def merge_settings(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with ``wanted`` set in it; other keys, nested ones too, stay."""
    out = dict(current)
    for key, value in wanted.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


# What the agent gets of the host's ~/.claude.json: enough to start signed in
# and past the first-run screens. The account (oauthAccount, userID), an API key
# signed in with (primaryApiKey) and the user's answer about ANTHROPIC_API_KEY
# (customApiKeyResponses), onboarding done (hasCompletedOnboarding,
# lastOnboardingVersion). Everything else stays on the host: mcpServers (with
# their tokens), projects (paths and history of every other project), caches.
CLAUDE_CONFIG_KEYS = ("oauthAccount", "userID", "primaryApiKey", "customApiKeyResponses",
                      "hasCompletedOnboarding", "lastOnboardingVersion")

TOOLS: dict[str, Tool] = {
    "claude": Tool("claude", "claude", ".claude", ("npm", "@anthropic-ai/claude-code"),
                   credential_files=(".claude/.credentials.json", ".claude/settings.json", ".claude.json"),
                   session_flag="--session-id", resume_flag="--resume", continue_flag="--continue",
                   headless=("-p",),  # --print; with --session-id it keeps the transcript under coi's id
                   sandbox_settings=(
                       (".claude/settings.json", {"permissions": {"defaultMode": "bypassPermissions"},
                                                  "allowDangerouslySkipPermissions": True}),
                       # Straight to the prompt: onboarding, the bypass-permissions warning, the
                       # auto-mode nudge and notice, the workspace trust question all answered.
                       (".claude.json", {"hasCompletedOnboarding": True, "bypassPermissionsModeAccepted": True,
                                         "hasSeenAutoDefaultNudge": True, "hasSeenAutoDefaultNotice": True,
                                         "projects": {"/workspace": {"hasTrustDialogAccepted": True,
                                                                     "hasCompletedProjectOnboarding": True}}}),
                   ),
                   kept_keys=((".claude.json", CLAUDE_CONFIG_KEYS),)),
    # Aider: no analytics question, update check, release notes or .gitignore question;
    # edits accepted without asking (the sandbox's no-prompt mode). With a key (-e) it
    # opens at its prompt, without one at its OpenRouter sign-in.
    "aider": Tool("aider", "aider", ".aider", ("pypi", "aider-chat"), env_vars=("OPENAI_API_KEY", "ANTHROPIC_API_KEY"),
                  prompt_flag="--message=",  # one message, the reply, then exit
                  seed_files=((".aider.conf.yml",
                               b"analytics-disable: true\ncheck-update: false\nshow-release-notes: false\n"
                               b"gitignore: false\nyes-always: true\n"),)),
    # Codex: /workspace trusted, no update check or full-access warning. An OPENAI_API_KEY
    # given to the agent signs it in as Codex documents (codex login --with-api-key), so it
    # opens at its prompt; without one (coi copies no host login) at its sign-in screen.
    "codex": Tool("codex", "codex", ".codex", ("npm", "@openai/codex"), env_vars=("OPENAI_API_KEY",),
                  # codex exec: read-only by default and only in a git repository; the container
                  # is the sandbox here, and /workspace need not be a repository.
                  headless=("exec", "--skip-git-repo-check", "--sandbox", "danger-full-access"),
                  seed_files=((".codex/config.toml",
                               b'check_for_update_on_startup = false\n\n[projects."/workspace"]\n'
                               b'trust_level = "trusted"\n\n[notice]\nhide_full_access_warning = true\n'),),
                  sign_in=('[ -e "$HOME/.codex/auth.json" ] || [ -z "${OPENAI_API_KEY:-}" ]'
                           ' || printenv OPENAI_API_KEY | "$0" login --with-api-key >/dev/null 2>&1'),
                  login_files=(".codex/auth.json",)),
    # Gemini CLI: no folder-trust question, no usage statistics, no auto-update; without a
    # key it opens at its sign-in screen.
    "gemini": Tool("gemini", "gemini", ".gemini", ("npm", "@google/gemini-cli"), env_vars=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
                   # -p/--prompt is its headless mode; with nobody to approve, every action is approved.
                   headless=("--approval-mode=yolo",), prompt_flag="--prompt=",
                   sandbox_settings=((".gemini/settings.json", {
                       # An API key given to the agent (GEMINI_API_KEY) is used without asking.
                       "security": {"folderTrust": {"enabled": False}, "auth": {"selectedType": "gemini-api-key"}},
                       "privacy": {"usageStatisticsEnabled": False},
                       "general": {"disableAutoUpdate": True, "disableUpdateNag": True}}),
                       (".gemini/trustedFolders.json", {"/workspace": "TRUST_FOLDER"}))),
    "opencode": Tool("opencode", "opencode", ".local/share/opencode", ("npm", "opencode-ai"),
                     env_vars=("ANTHROPIC_API_KEY", "OPENAI_API_KEY"), headless=("run",)),
}


def get_tool(name: str) -> Tool:
    """The agent tool called ``name``; a name coi does not know is a usage error."""
    try:
        return TOOLS[name]
    except KeyError:
        from coi.errors import UsageError

        raise UsageError(f"unknown agent tool {name!r}", "choose from " + ", ".join(TOOLS)) from None


def host_home() -> Path:
    return Path(os.path.expanduser("~"))
