"""What the README tells a person to do, on the real ``coi`` image with the real agent
(Claude Code, not logged in: its prompt needs no credentials), as a normal user.

The image is the one ``coi build`` makes by default (Debian 13, Node.js from PyPI,
Docker, gh); it is built once and cached while its inputs stay the same.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from coi.wait import wait_for
from netbackend import user_proxies
from terminal import Terminal

pytestmark = pytest.mark.acceptance

# What Claude Code shows at its input prompt when nobody is logged in.
PROMPT = "Not logged in"
# Dialogs a sandbox must never show (trust, permission mode, onboarding, theme).
DIALOGS = ("trust this folder", "Do you trust", "auto mode your default", "Choose the text style",
           "Select login method", "Press Enter to continue", "WARNING: Claude Code running in Bypass")


def start(user, workspace, *args: str) -> str:
    return user.background(workspace, *args)["container"]


def pane(user, name: str) -> str:
    proc = user.run(["tmux", "capture", name])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def in_container(user, name: str, script: str) -> subprocess.CompletedProcess[str]:
    """A command as code, the way the agent's own commands run."""
    return user.run(["container", "exec", name, "--user", "1000", "--", "sh", "-c", script])


def test_claude_starts_straight_at_its_prompt(real_user, workspace):
    name = start(real_user, workspace)
    wait_for(lambda: PROMPT in pane(real_user, name), timeout=60, what="Claude Code's prompt")
    screen = pane(real_user, name)
    assert "❯" in screen and "bypass permissions on" in screen, screen
    assert not [d for d in DIALOGS if d.lower() in screen.lower()], screen
    versions = in_container(real_user, name, "node --version; claude --version; tmux -S ~/.tmux-coi.sock show -g focus-events")
    assert versions.returncode == 0, versions.stderr
    node, claude, focus = versions.stdout.splitlines()
    assert int(node.lstrip("v").split(".")[0]) >= 22 and "Claude Code" in claude and focus.endswith("on")


DOCKER_IMAGE = ('tar -C / -chf /tmp/true.tar usr/bin/true $(ldd /usr/bin/true | grep -o "/[^ ]*" | sed "s#^/##") '
                '&& docker import /tmp/true.tar coi-acceptance-true >/dev/null '
                '&& docker run --rm --network none coi-acceptance-true /usr/bin/true && echo ran-in-docker')


def test_coi_run_has_docker_git_gh_and_sudo(real_user, workspace):
    proc = real_user.run(["run", "--", "sh", "-c",
                          f"id -Gn; {DOCKER_IMAGE}; git --version; gh --version | head -n1; sudo -n id -u"],
                         cwd=workspace)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert {"docker", "sudo"} <= set(lines[0].split()), lines
    assert "ran-in-docker" in lines and lines[-1] == "0", lines
    assert any(l.startswith("git version") for l in lines) and any(l.startswith("gh version") for l in lines)


def test_a_session_detaches_attaches_uses_docker_and_poweroff_saves(real_user, workspace, incus):
    term = Terminal(real_user.argv(["coi", "shell"], env={"TERM": "xterm-256color"}), cwd=str(workspace))
    term.wait_for("Workspace: ")
    name = next(l.split(": ", 1)[1].strip() for l in term.output().splitlines() if l.startswith("Container: "))
    term.wait_for(PROMPT, timeout=90)
    term.detach()
    assert term.finish() == 0 and incus.instance(name)["status"] == "Running"

    term = Terminal(real_user.argv(["coi", "attach", name], env={"TERM": "xterm-256color"}), cwd=str(workspace))
    term.wait_for(PROMPT, timeout=60)  # the agent is still there
    term.detach()
    assert term.finish() == 0

    # The agent's shell in the same session: Docker as code, then the person ends it.
    term = Terminal(real_user.argv(["coi", "attach", name, "--bash"], env={"TERM": "xterm-256color"}),
                    cwd=str(workspace))
    term.wait_for("code@")
    term.type(f"{DOCKER_IMAGE} > /workspace/docker.out 2>&1; echo docker-$((40 + 2))-done")
    term.wait_for("docker-42-done", timeout=120)
    assert "ran-in-docker" in (workspace / "docker.out").read_text()
    term.type("sudo poweroff")
    term.wait_for("Session data saved", timeout=120)
    assert term.finish() == 0
    assert not incus.exists(name)
    saved = json.loads(real_user.run(["list", "--all", "--format", "json"], cwd=workspace).stdout)["saved_sessions"]
    assert [s["container_name"] for s in saved] == [name]


def test_resume_starts_the_real_agent_with_its_state_in_place(real_user, workspace, incus):
    name = start(real_user, workspace)
    wait_for(lambda: PROMPT in pane(real_user, name), timeout=60, what="Claude Code's prompt")
    marker = in_container(real_user, name, "mkdir -p ~/.claude/todos && echo kept > ~/.claude/todos/coi-test.json")
    assert marker.returncode == 0, marker.stderr
    assert real_user.run(["shutdown", name, "--timeout", "30"], cwd=workspace).returncode == 0

    name = start(real_user, workspace, "--resume")
    wait_for(lambda: PROMPT in pane(real_user, name), timeout=60, what="the resumed Claude Code's prompt")
    state = in_container(real_user, name, "cat ~/.claude/todos/coi-test.json; ps -o args= -C claude")
    assert state.returncode == 0, state.stderr
    assert state.stdout.splitlines()[0] == "kept"
    # No conversation was had (nobody logged in): the agent starts again rather than
    # stopping at "No conversation found to continue".
    assert "claude" in state.stdout and "No conversation found" not in pane(real_user, name), state.stdout
    assert real_user.run(["kill", name]).returncode == 0


# Every other agent of 'coi build --tools all', from the real binaries: what a person sees first.
# With a key given to the agent (-e; never checked before the first request) each opens at
# its prompt; without one at its own sign-in screen. No trust, update, telemetry, analytics
# or theme question comes first.
KEY = "not-a-real-key"
AGENTS = [
    ("opencode", [], "Ask anything"),
    ("gemini", ["-e", f"GEMINI_API_KEY={KEY}"], "Type your message"),
    ("gemini", [], "Gemini API key"),
    ("codex", ["-e", f"OPENAI_API_KEY={KEY}"], "Ask Codex to do anything"),
    ("codex", [], "Welcome to Codex"),
    ("aider", ["-e", f"OPENAI_API_KEY={KEY}"], "Main model:"),
    ("aider", [], "OpenRouter"),
]


@pytest.mark.parametrize("tool, args, first_screen", AGENTS, ids=[f"{a[0]}{'-key' if a[1] else ''}" for a in AGENTS])
def test_every_agent_opens_at_its_own_screen(coi_user, agents_image, nft_sudo, workspace, tool, args, first_screen):
    cfg = coi_user.home / ".config" / "coi" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[defaults]\nimage = "{agents_image}"\n[tool]\nname = "{tool}"\n'
                   f'[network]\nprivileged_command = {json.dumps(nft_sudo)}\n')
    try:
        name = start(coi_user, workspace, *args)
        wait_for(lambda: first_screen in pane(coi_user, name), timeout=90, what=f"{tool}'s first screen")
        screen = pane(coi_user, name).lower()
        assert not [d for d in ("trust the files", "do you trust", "update available", "usage statistics",
                                "select a theme", "collection of anonymous analytics", "add .aider")
                    if d in screen], screen
        version = in_container(coi_user, name, f"{tool} --version")
        assert version.returncode == 0 and version.stdout.strip(), version.stderr
    finally:
        coi_user.run(["kill", "--all", "--force"])
        cfg.unlink(missing_ok=True)


def test_all_installs_every_agent_on_debian_13(incus, agents_image):
    tools = incus.image_by_alias(agents_image)["properties"]["coi.tools"].split(",")
    assert tools == ["claude", "codex", "gemini", "opencode", "aider"]


def test_claude_works_on_a_branch_of_its_own_and_the_work_is_merged(real_user, workspace):
    """The README's branch workflow on the real image: Claude Code opens in the copy, the
    work (committed in the container with the image's own git) is reviewed and merged."""
    def git(*args: str) -> str:
        proc = subprocess.run(real_user.argv(["git", "-c", "user.name=Me", "-c", "user.email=me@example.invalid",
                                              *args]), cwd=workspace, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    (workspace / "app.txt").write_text("v1\n")
    subprocess.run(["chown", f"{real_user.uid}:{real_user.gid}", str(workspace / "app.txt")], check=True)
    git("init", "-q", "--initial-branch=main")
    git("add", "app.txt")
    git("commit", "-qm", "first")
    info = real_user.background(workspace, "--branch", "accept")
    assert info["branch"] == "coi/accept"
    name = info["container"]
    wait_for(lambda: PROMPT in pane(real_user, name), timeout=60, what="Claude Code's prompt")
    assert not [d for d in DIALOGS if d.lower() in pane(real_user, name).lower()]
    work = in_container(real_user, name, "cd /workspace && git branch --show-current && echo v2 > app.txt "
                                         "&& git commit -qam 'agent: v2' && git log --oneline | wc -l")
    assert work.returncode == 0, work.stderr
    assert work.stdout.split() == ["coi/accept", "2"]
    assert (workspace / "app.txt").read_text() == "v1\n"  # the host's tree is not the agent's
    assert "+v2" in real_user.run(["diff", "accept"], cwd=workspace).stdout
    assert real_user.run(["shutdown", name], cwd=workspace).returncode == 0
    merged = real_user.run(["merge", "accept", "--format", "json"], cwd=workspace)
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["outcome"] == "fast-forward"
    assert (workspace / "app.txt").read_text() == "v2\n"
    assert real_user.run(["discard", "accept", "--force"], cwd=workspace).returncode == 0


SECRET_ENV = "COI_ACCEPTANCE_SECRET"


@pytest.fixture
def by_name_user(coi_user, coi_image, nft_sudo):
    """The test user on the real image with the README's allowlist by name: two registries
    listed (every registry here sits behind one address) and a credential for one."""
    from conftest import configured

    yield from configured(coi_user, f'[defaults]\nimage = "{coi_image}"\n\n'
                                    '[network]\nmode = "allowlist"\nallowed_domains = ["pypi.org", "deb.debian.org"]\n'
                                    f'privileged_command = {json.dumps(nft_sudo)}\n\n'
                                    '[[credentials]]\nname = "acceptance"\nhosts = ["pypi.org"]\n'
                                    f'header = "X-Coi-Acceptance"\nenv = "{SECRET_ENV}"\n')


def test_the_allowlist_by_name_tells_registries_apart_on_the_real_image(by_name_user, workspace):
    import os

    secret = "acceptance-" + os.urandom(8).hex()
    name = by_name_user.background(workspace, env={SECRET_ENV: secret})["container"]
    # pypi.org is a credential's host: its TLS is ended by coi's proxy, with the CA coi put
    # into the image's trust store; deb.debian.org is spliced through; npm is not listed.
    probe = in_container(by_name_user, name,
                         "curl -sS -o /dev/null -w '%{http_code} ' https://pypi.org/simple/pip/; "
                         "curl -sS -o /dev/null -w '%{http_code} ' https://deb.debian.org/debian/dists/trixie/Release; "
                         "curl -sS -o /dev/null -w '%{http_code} ' http://deb.debian.org/debian/dists/trixie/Release; "
                         "curl -s -o /dev/null --max-time 10 https://registry.npmjs.org/; echo $?")
    codes = probe.stdout.split()
    assert codes[:3] == ["200", "200", "200"] and codes[3] in ("35", "56"), probe.stdout + probe.stderr
    inside = by_name_user.run(["container", "exec", name, "--", "sh", "-c",
                               f"grep -rsl {secret} /etc /home /root /tmp /workspace /proc/[0-9]*/environ; "
                               "grep -ls coi-placeholder-acceptance /proc/[0-9]*/environ | head -n1"])
    assert inside.stdout.split() and "/environ" in inside.stdout.split()[-1], inside.stdout + inside.stderr
    assert len(inside.stdout.split()) == 1, inside.stdout  # the agent has the placeholder; the secret is nowhere

    def logged() -> list[dict]:
        proc = by_name_user.run(["logs", name, "--network", "--format", "json"])
        return [json.loads(line) for line in proc.stdout.splitlines()] if proc.returncode == 0 else []
    expected = {("pypi.org", "allowed"), ("deb.debian.org", "allowed"), ("registry.npmjs.org", "refused")}
    # (the agent itself may try hosts of its own: refused and logged too; a line is written as its
    # connection ends, the bytes then)
    wait_for(lambda: expected <= {(e["name"], e["verdict"]) for e in logged()}
             and sum("bytes_received" in e for e in logged() if e["name"] != "registry.npmjs.org") >= 3,
             timeout=10, what="the probe's connections in the log")
    entries = logged()
    ours = [(e["name"], e["kind"]) for e in entries if e["name"] in ("pypi.org", "deb.debian.org")]
    # the credential's host: its TLS, then each request in it (Host checked again); the others one line each
    assert sorted(ours) == [("deb.debian.org", "http"), ("deb.debian.org", "tls"), ("pypi.org", "https"),
                            ("pypi.org", "tls")], entries
    counted = [e for e in entries if e["name"] in ("pypi.org", "deb.debian.org") and "bytes_received" in e]
    assert len(counted) == 3 and all(e["bytes_received"] > 1000 for e in counted), entries  # one per connection
    assert secret not in json.dumps(entries)
    [listed] = [c for c in json.loads(by_name_user.run(["list", "--format", "json"]).stdout)["active_containers"]
                if c["name"] == name]
    # (the agent keeps trying hosts of its own: the count only grows after the log was read)
    assert listed["refused_connections"] >= sum(e["verdict"] == "refused" for e in entries) >= 1
    assert by_name_user.run(["kill", name, "--force"]).returncode == 0
    assert not user_proxies(by_name_user.home / ".coi"), "the proxy outlived the user's last session"


def test_a_headless_prompt_reaches_claude_which_says_it_is_not_logged_in(real_user, workspace):
    """``coi run --prompt`` runs the real ``claude -p``: nobody is logged in, so Claude Code's own
    sign-in error comes back with its non-zero exit code, and the session is saved and resumes."""
    import re

    proc = real_user.run(["run", "--timeout", "120", "--prompt", "hi"], cwd=workspace, input="")
    said = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124), said  # claude's own failure, not a timeout
    assert re.search(r"not logged in|/login|invalid api key|authentication", said, re.I), said
    assert "Traceback" not in said and "unexpected failure" not in said
    sid = re.search(r"^Session ID: (\S+)$", proc.stderr, re.M)[1]
    assert (real_user.home / ".coi" / "sessions-claude" / sid / "metadata.json").is_file()
    name = start(real_user, workspace, "--resume")
    wait_for(lambda: PROMPT in pane(real_user, name), timeout=60, what="the resumed Claude Code's prompt")
    assert "No conversation found" not in pane(real_user, name)
    assert real_user.run(["kill", name]).returncode == 0


HEADLESS = [("codex", ["-e", f"OPENAI_API_KEY={KEY}"]), ("gemini", ["-e", f"GEMINI_API_KEY={KEY}"]),
            ("aider", ["-e", f"OPENAI_API_KEY={KEY}"]), ("opencode", [])]
USAGE_ERROR = r"unexpected argument|unrecognized (arguments?|subcommand)|unknown arguments?|^usage:"


@pytest.mark.parametrize("tool, args", HEADLESS, ids=[h[0] for h in HEADLESS])
def test_every_agent_takes_its_headless_flags(coi_user, agents_image, nft_sudo, workspace, tool, args):
    """The real binaries accept the headless command lines coi gives them (coi.tools): with a
    key that is not real, each fails at its provider (or runs out of time), never at its flags."""
    import re
    import shutil

    cfg = coi_user.home / ".config" / "coi" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'[defaults]\nimage = "{agents_image}"\n[tool]\nname = "{tool}"\n'
                   f'[network]\nprivileged_command = {json.dumps(nft_sudo)}\n')
    try:  # a prompt starting with "-": an option to none of them
        proc = coi_user.run(["run", "--timeout", "60", *args, "--prompt=-say hi"], cwd=workspace, input="")
        said = proc.stdout + proc.stderr
        assert not re.search(USAGE_ERROR, said, re.I | re.M), said
        assert "Session data saved" in proc.stderr and "Traceback" not in said, said
    finally:
        coi_user.run(["kill", "--all", "--force"])
        cfg.unlink(missing_ok=True)
        shutil.rmtree(coi_user.home / ".coi", ignore_errors=True)  # the saved sessions of these runs
