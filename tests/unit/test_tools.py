"""Agent tool definitions: command lines, session ids, credentials and settings."""

from __future__ import annotations

import json
import os
import time

import pytest

from coi.tools import TOOLS, merge_settings

pytestmark = pytest.mark.unit
SID = "0b6c5f0e-1111-4222-8333-444455556666"


@pytest.mark.parametrize("tool, kwargs, argv", [
    ("claude", {"session_id": SID}, ["claude", "--session-id", SID]),
    ("claude", {"resume_id": SID}, ["claude", "--resume", SID]),
    ("claude", {"resume_latest": True}, ["claude", "--continue"]),
    ("claude", {"binary": "fake-claude", "session_id": SID}, ["fake-claude", "--session-id", SID]),
    ("aider", {"session_id": SID}, ["aider"]),
    ("gemini", {}, ["gemini"]),
    ("opencode", {"binary": "/opt/oc"}, ["/opt/oc"]),
])
def test_command_lines(tool, kwargs, argv):
    assert TOOLS[tool].command(**kwargs) == argv


def test_claude_finds_its_latest_session_id(tmp_path):
    project = tmp_path / "projects" / "-workspace"
    project.mkdir(parents=True)
    (project / "a.jsonl").write_text("{}")
    os.utime(project / "a.jsonl", (time.time() - 100, time.time() - 100))
    (project / f"{SID}.jsonl").write_text("{}")
    assert TOOLS["claude"].find_session_id(tmp_path) == SID
    assert TOOLS["claude"].find_session_id(tmp_path / "empty") is None
    assert TOOLS["aider"].find_session_id(tmp_path) is None


def test_credentials_copy_only_essentials_and_keep_user_settings(tmp_path):
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text('{"t": 1}')
    (tmp_path / ".claude" / "settings.json").write_text(json.dumps({"permissions": {"allow": ["Bash"]}, "x": 1}))
    (tmp_path / ".claude" / "history.jsonl").write_text("private")
    (tmp_path / ".ssh").mkdir()
    files = TOOLS["claude"].credentials(tmp_path)
    assert set(files) == {".claude/.credentials.json", ".claude/settings.json", ".claude.json"}
    settings = json.loads(files[".claude/settings.json"])
    assert settings == {"permissions": {"allow": ["Bash"], "defaultMode": "bypassPermissions"}, "x": 1,
                        "allowDangerouslySkipPermissions": True}
    assert json.loads(files[".claude.json"])["hasCompletedOnboarding"] is True


def test_credentials_without_host_files_still_allow_sandboxed_use(tmp_path):
    files = TOOLS["claude"].credentials(tmp_path)
    assert ".claude/.credentials.json" not in files
    assert json.loads(files[".claude/settings.json"]) == {"permissions": {"defaultMode": "bypassPermissions"},
                                                         "allowDangerouslySkipPermissions": True}


def test_api_key_tools_copy_nothing_from_the_host(tmp_path):
    (tmp_path / ".codex").mkdir()
    (tmp_path / ".codex" / "auth.json").write_text('{"OPENAI_API_KEY": "host-secret"}')
    (tmp_path / ".gemini").mkdir()
    (tmp_path / ".gemini" / "oauth_creds.json").write_text('{"token": "host-secret"}')
    for name in ("aider", "codex", "gemini", "opencode"):
        files = TOOLS[name].credentials(tmp_path)
        assert not [c for c in files.values() if b"host-secret" in c]
        assert set(files) <= {".aider.conf.yml", ".codex/config.toml", ".gemini/settings.json",
                              ".gemini/trustedFolders.json"}
        assert TOOLS[name].env_vars


@pytest.mark.parametrize("current, wanted, merged", [
    ({}, {"a": 1}, {"a": 1}),
    ({"a": {"b": 1}}, {"a": {"c": 2}}, {"a": {"b": 1, "c": 2}}),
    ({"a": 1}, {"a": {"c": 2}}, {"a": {"c": 2}}),
    ({"a": {"b": 1}, "k": 0}, {"a": {"b": 2}}, {"a": {"b": 2}, "k": 0}),
])
def test_merge_settings(current, wanted, merged):
    assert merge_settings(current, wanted) == merged


HOST_CLAUDE_JSON = {
    "oauthAccount": {"accountUuid": "a-1", "emailAddress": "me@example.com"},
    "userID": "u-1",
    "primaryApiKey": "sk-ant-key",
    "customApiKeyResponses": {"approved": ["abc"], "rejected": []},
    "hasCompletedOnboarding": False,
    "lastOnboardingVersion": "1.0.0",
    "mcpServers": {"github": {"command": "gh-mcp", "env": {"GITHUB_TOKEN": "ghp_secret"}}},
    "projects": {"/home/me/secret-project": {"history": [{"display": "deploy with password hunter2"}],
                                             "mcpServers": {"db": {"env": {"PGPASSWORD": "x"}}}}},
    "tipsHistory": {"a": 1},
    "numStartups": 42,
}
SANDBOX = {"hasCompletedOnboarding": True, "bypassPermissionsModeAccepted": True,
           "hasSeenAutoDefaultNudge": True, "hasSeenAutoDefaultNotice": True,
           "projects": {"/workspace": {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}}}
SIGNED_IN = {"oauthAccount": HOST_CLAUDE_JSON["oauthAccount"], "userID": "u-1", "primaryApiKey": "sk-ant-key",
             "customApiKeyResponses": {"approved": ["abc"], "rejected": []}, "lastOnboardingVersion": "1.0.0"}


@pytest.mark.parametrize("host_file, full, expected", [
    pytest.param(json.dumps(HOST_CLAUDE_JSON), False, {**SIGNED_IN, **SANDBOX}, id="only-the-allowlist"),
    pytest.param(None, False, SANDBOX, id="no-host-file"),
    pytest.param("{not json", False, SANDBOX, id="bad-json"),
    pytest.param("[1, 2]", False, SANDBOX, id="not-an-object"),
    pytest.param('"text"', False, SANDBOX, id="a-string"),
    pytest.param("", False, SANDBOX, id="empty"),
    pytest.param(json.dumps({"userID": "u-2", "mcpServers": {"x": {}}}), False, {"userID": "u-2", **SANDBOX},
                 id="some-keys"),
    pytest.param(json.dumps(HOST_CLAUDE_JSON), True,
                 {**HOST_CLAUDE_JSON, **SANDBOX, "projects": {**HOST_CLAUDE_JSON["projects"], **SANDBOX["projects"]}},
                 id="full-host-config-opt-in"),
    pytest.param("{not json", True, SANDBOX, id="full-but-bad-json"),
])
def test_claude_json_is_minimal_unless_the_user_opts_in(tmp_path, host_file, full, expected):
    if host_file is not None:
        (tmp_path / ".claude.json").write_text(host_file)
    files = TOOLS["claude"].credentials(tmp_path, full_host_config=full)
    assert json.loads(files[".claude.json"]) == expected
    if not full:
        text = files[".claude.json"].decode()
        for secret in ("ghp_secret", "secret-project", "hunter2", "PGPASSWORD", "mcpServers"):
            assert secret not in text


def test_full_host_config_leaves_the_other_files_as_they_are(tmp_path):
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text('{"t": 1}')
    (tmp_path / ".claude" / "settings.json").write_text('{"x": 1}')
    assert TOOLS["claude"].credentials(tmp_path, full_host_config=True).keys() == \
        TOOLS["claude"].credentials(tmp_path).keys()
    minimal = TOOLS["claude"].credentials(tmp_path)
    assert minimal[".claude/.credentials.json"] == b'{"t": 1}'
    assert json.loads(minimal[".claude/settings.json"]) == {"x": 1, "permissions": {"defaultMode": "bypassPermissions"},
                                                           "allowDangerouslySkipPermissions": True}


def test_claude_resumes_its_own_transcript_or_starts_fresh(tmp_path):
    from coi.tools import get_tool

    claude = get_tool("claude")
    assert claude.resume_command(tmp_path, session_id="s1") == ["claude", "--session-id", "s1"]
    (tmp_path / "projects" / "-workspace").mkdir(parents=True)
    (tmp_path / "projects" / "-workspace" / "abc.jsonl").write_text("{}\n")
    assert claude.resume_command(tmp_path, session_id="s1") == ["claude", "--resume", "abc"]
    assert get_tool("codex").resume_command(tmp_path) == get_tool("codex").command(resume_latest=True)


def test_codex_and_gemini_get_their_first_run_answers(tmp_path):
    import tomllib

    from coi.tools import get_tool

    codex = get_tool("codex").credentials(tmp_path)
    config = tomllib.loads(codex[".codex/config.toml"].decode())
    assert config["projects"]["/workspace"]["trust_level"] == "trusted"
    assert config["check_for_update_on_startup"] is False
    gemini = get_tool("gemini").credentials(tmp_path)
    settings = json.loads(gemini[".gemini/settings.json"])
    assert settings["security"]["folderTrust"]["enabled"] is False
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert json.loads(gemini[".gemini/trustedFolders.json"]) == {"/workspace": "TRUST_FOLDER"}



def test_aider_gets_its_first_run_answers(tmp_path):
    conf = TOOLS["aider"].credentials(tmp_path)[".aider.conf.yml"].decode().splitlines()
    for line in ("analytics-disable: true", "check-update: false", "show-release-notes: false",
                 "gitignore: false", "yes-always: true"):
        assert line in conf


def _fake_codex(tmp_path):
    """A codex stand-in that records its logins (with the key read from stdin) and its start."""
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    binary = tmp_path / "codex"
    binary.write_text('#!/bin/sh\nif [ "$1" = login ]; then echo "login $2 $(cat)" >> "$HOME/calls";'
                      ' echo x > "$HOME/.codex/auth.json"; exit 0; fi\necho "start $*" >> "$HOME/calls"\n')
    binary.chmod(0o755)
    return home, str(binary)


@pytest.mark.parametrize("key, logged_in, calls", [
    ("sk-given", False, ["login --with-api-key sk-given", "start --flag"]),
    ("sk-given", True, ["start --flag"]),  # a login of its own (ChatGPT, say) is kept
    (None, False, ["start --flag"]),  # no key: Codex shows its sign-in screen
])
def test_codex_is_signed_in_with_the_key_it_was_given(tmp_path, key, logged_in, calls):
    import subprocess

    home, binary = _fake_codex(tmp_path)
    if logged_in:
        (home / ".codex" / "auth.json").write_text("{}")
    argv = TOOLS["codex"].command(binary=binary)
    argv.append("--flag")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), **({"OPENAI_API_KEY": key} if key else {})}
    assert subprocess.run(argv, env=env).returncode == 0
    assert (home / "calls").read_text().splitlines() == calls


def test_logins_and_credentials_are_never_saved():
    assert TOOLS["codex"].unsaved_files() == ["auth.json"]
    assert TOOLS["claude"].unsaved_files() == [".credentials.json", "settings.json"]


# ---- headless: coi run --prompt ---------------------------------------------------------

HOSTILE = "it's \"$(touch /tmp/pwned)\" `id` $HOME;\nrm -rf / # --help -p"


@pytest.mark.parametrize("tool, kwargs, argv", [
    ("claude", {"session_id": SID}, ["claude", "--session-id", SID, "-p", "--", "fix it"]),
    ("claude", {"binary": "fake-claude"}, ["fake-claude", "-p", "--", "fix it"]),
    ("aider", {"session_id": SID}, ["aider", "--message=fix it"]),
    ("gemini", {}, ["gemini", "--approval-mode=yolo", "--prompt=fix it"]),
    ("opencode", {"binary": "/opt/oc"}, ["/opt/oc", "run", "--", "fix it"]),
])
def test_headless_command_lines(tool, kwargs, argv):
    assert TOOLS[tool].headless_command("fix it", **kwargs) == argv


def test_codex_answers_headless_behind_its_sign_in():
    argv = TOOLS["codex"].headless_command("fix it")
    assert argv[:2] == ["sh", "-c"] and argv[2].endswith('; exec "$0" "$@"')
    assert argv[3:] == ["codex", "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", "--", "fix it"]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_hostile_prompt_is_one_argument_and_never_shell_text(tool):
    argv = TOOLS[tool].headless_command(HOSTILE)
    flag = TOOLS[tool].prompt_flag
    assert argv[-1] == flag + HOSTILE and sum(HOSTILE in a for a in argv) == 1
    if argv[0] == "sh":  # the sign-in shell: the prompt is one of its "$@", not in its script
        assert HOSTILE not in argv[2]


def test_the_sign_in_shell_hands_the_prompt_on_verbatim(tmp_path):
    """Run through a real sh: the agent gets the prompt byte for byte, and nothing in it ran."""
    import subprocess

    home, binary = _fake_codex(tmp_path)
    marker = tmp_path / "pwned"
    prompt = HOSTILE.replace("/tmp/pwned", str(marker)) + f"; touch {marker} | touch {marker}"
    argv = TOOLS["codex"].headless_command(prompt, binary=binary)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "OPENAI_API_KEY": "sk-given"}
    assert subprocess.run(argv, env=env, cwd=tmp_path).returncode == 0
    calls = (home / "calls").read_text()
    assert calls.endswith(f"start exec --skip-git-repo-check --sandbox danger-full-access -- {prompt}\n")
    assert not marker.exists()


def test_every_tool_has_a_headless_mode():
    assert all(TOOLS[name].has_headless for name in TOOLS)
