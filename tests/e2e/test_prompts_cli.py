"""Headless runs (coi run --prompt, --prompt-file, --prompt-name) with the stand-in agent:
the answer streamed, the agent's exit code returned, the session saved and resumed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from coi.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def agent_user(session_user):
    """The session user with a login of their own, which the agent must get."""
    claude = session_user.home / ".claude"
    claude.mkdir(exist_ok=True)
    (claude / ".credentials.json").write_text(json.dumps({"token": "headless"}))
    for p in (claude, claude / ".credentials.json"):
        os.chown(p, session_user.uid, session_user.gid)
    yield session_user
    shutil.rmtree(claude, ignore_errors=True)


def add_config(user, text: str) -> None:
    config = user.home / ".config" / "coi" / "config.toml"
    config.write_text(config.read_text() + "\n" + text)


def agent_lines(stdout: str) -> dict[str, str]:
    """What fake-claude printed, by its first word: ARGS and PROMPT are JSON."""
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in stdout.splitlines() if " " in line}


def said(stderr: str, label: str) -> str:
    return next(line.split(": ", 1)[1].strip() for line in stderr.splitlines() if line.startswith(label + ": "))


def names_in(user, workspace) -> list[str]:
    proc = user.run(["list", "--format", "json"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    return [c["name"] for c in json.loads(proc.stdout)["active_containers"] if c["workspace"] == str(workspace)]


def pane(user, name: str) -> str:
    proc = user.run(["tmux", "capture", name])
    return proc.stdout if proc.returncode == 0 else ""


def test_a_prompt_is_answered_headless_with_the_agents_code_and_resume_continues_it(agent_user, workspace):
    proc = agent_user.run(["run", "--prompt", "remember the apples EXIT=3"], cwd=workspace, input="")
    assert proc.returncode == 3, proc.stderr
    sid = said(proc.stderr, "Session ID")
    out = agent_lines(proc.stdout)
    assert json.loads(out["ARGS"]) == ["--session-id", sid, "-p", "--", "remember the apples EXIT=3"]
    assert json.loads(out["PROMPT"]) == "remember the apples EXIT=3"
    assert out["CREDENTIALS"] == '{"token": "headless"}' and out["MODE"] == "bypassPermissions"
    assert "Session data saved" in proc.stderr and f"coi shell --resume={sid}" in proc.stderr
    assert names_in(agent_user, workspace) == []  # ephemeral: gone
    saved = agent_user.home / ".coi" / "sessions-claude" / sid
    assert (saved / "state" / "projects" / "-workspace" / f"{sid}.jsonl").is_file()
    assert not (saved / "state" / ".credentials.json").exists()

    info = agent_user.background(workspace, "--resume")
    try:
        assert info["session_id"] == sid
        wait_for(lambda: f"RESUMED {sid} remembering: remember the apples EXIT=3" in pane(agent_user, info["container"]),
                 timeout=30, what="the agent to resume the headless conversation")
        args = next(l for l in pane(agent_user, info["container"]).splitlines() if l.startswith("ARGS "))
        assert json.loads(args[5:]) == ["--resume", sid]
    finally:
        agent_user.run(["kill", info["container"]])


def test_named_prompts_files_and_standard_input(session_user, workspace):
    add_config(session_user, '[prompts]\nreview = "Review the diff EXIT=0"\n')
    proc = session_user.run(["run", "--prompt-name", "review"], cwd=workspace, input="")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(agent_lines(proc.stdout)["PROMPT"]) == "Review the diff EXIT=0"
    config = session_user.home / ".config" / "coi" / "config.toml"
    assert f"Prompt: review from {config}" in proc.stderr

    task = workspace / "task.md"
    task.write_text("Fix the tests.\nThen say so. EXIT=4\n")
    os.chown(task, session_user.uid, session_user.gid)
    proc = session_user.run(["run", "--prompt-file", "task.md"], cwd=workspace, input="")
    assert proc.returncode == 4, proc.stderr
    assert json.loads(agent_lines(proc.stdout)["PROMPT"]) == task.read_text()

    proc = session_user.run(["run", "--prompt-file", "-"], cwd=workspace, input="from a pipe EXIT=5")
    assert proc.returncode == 5 and json.loads(agent_lines(proc.stdout)["PROMPT"]) == "from a pipe EXIT=5"
    assert names_in(session_user, workspace) == []


def test_capture_gives_the_answer_and_code_as_json(session_user, workspace):
    proc = session_user.run(["run", "--capture", "--prompt", "captured EXIT=2"], cwd=workspace, input="")
    assert proc.returncode == 2, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 2 and 'PROMPT "captured EXIT=2"' in result["stdout"]


def test_a_persistent_container_answers_prompt_after_prompt(session_user, workspace):
    """Its second run must not hand the agent the session id its first conversation took."""
    for prompt in ("first EXIT=0", "second EXIT=0"):
        proc = session_user.run(["run", "--persistent", "--prompt", prompt], cwd=workspace, input="")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(agent_lines(proc.stdout)["PROMPT"]) == prompt
    [name] = names_in(session_user, workspace)
    session_user.run(["kill", name])


@pytest.mark.parametrize("args, code, message", [
    (["run", "--prompt", "x", "--", "true"], 2, "cannot be given with it"),
    (["run", "--prompt", "x", "--prompt-file", "y"], 2, "exclude each other"),
    (["run", "--prompt-name", "nope"], 2, "unknown prompt 'nope'"),
    (["run", "--prompt-file", "missing.md"], 1, "prompt file missing.md does not exist"),
    (["run", "--prompt-file", "."], 1, "is a directory, not a file"),
])
def test_bad_prompts_are_refused_before_anything_exists(session_user, workspace, args, code, message):
    proc = session_user.run(args, cwd=workspace, input="")
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert names_in(session_user, workspace) == []


def test_a_huge_prompt_file_is_refused_before_anything_exists(session_user, workspace):
    big = workspace / "big.md"
    big.write_text("x" * (100 * 1024 + 1))
    os.chown(big, session_user.uid, session_user.gid)
    proc = session_user.run(["run", "--prompt-file", "big.md"], cwd=workspace, input="")
    assert proc.returncode == 1 and "a prompt may have at most 102400 bytes" in proc.stderr, proc.stderr
    assert names_in(session_user, workspace) == []
