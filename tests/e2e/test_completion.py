"""Shell completion scripts load and offer real container names and session ids."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.e2e


def complete(user, words: list[str]) -> set[str]:
    script = ('eval "$(coi completion bash)"; COMP_WORDS=(' + " ".join(f"'{w}'" for w in words) + ');'
              f' COMP_CWORD={len(words) - 1}; _coi; printf "%s\\n" "${{COMPREPLY[@]}}"')
    proc = subprocess.run(user.argv(["bash", "-c", script]), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_bash_completion_offers_commands_flags_and_live_names(session_user, workspace):
    assert {"shell", "run", "attach", "image", "container"} <= complete(session_user, ["coi", ""])
    assert {"list", "cleanup"} <= complete(session_user, ["coi", "image", ""])
    assert "--persistent" in complete(session_user, ["coi", "shell", "--pers"])
    name = session_user.background(workspace, "--debug")["container"]
    assert name in complete(session_user, ["coi", "attach", ""])
    assert name in complete(session_user, ["coi", "tmux", "send", ""])
    assert session_user.run(["shutdown", name, "--timeout", "20"]).returncode == 0
    saved = session_user.run(["__complete", "sessions"]).stdout.split()
    assert len(saved) == 1
    assert f"--resume={saved[0]}" in complete(session_user, ["coi", "shell", "--resume="])
    assert saved[0] in complete(session_user, ["coi", "info", ""])


def zsh_complete(user, words: list[str]) -> set[str]:
    """What the zsh script offers for ``words`` (the last one being completed): compadd
    and the other zsh completion builtins stand in, printing what they are given."""
    script = ('compadd() { print -r -- "$@" }; compdef() {}; _files() {}; compset() {}; '
              'source <(coi completion zsh); words=(' + " ".join(f"'{w}'" for w in words) + f'); '
              f'CURRENT={len(words)}; _coi')
    proc = subprocess.run(user.argv(["zsh", "-c", script]), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split()) - {"--"}


def test_zsh_completion_is_a_real_compdef_script(session_user, workspace):
    script = session_user.run(["completion", "zsh"]).stdout
    assert script.startswith("#compdef coi\n") and "bashcompinit" not in script
    assert {"shell", "image", "container"} <= zsh_complete(session_user, ["coi", ""])
    assert {"list", "cleanup"} <= zsh_complete(session_user, ["coi", "image", ""])
    assert "--persistent" in zsh_complete(session_user, ["coi", "shell", "--pers"])
    name = session_user.background(workspace, "--debug")["container"]
    assert name in zsh_complete(session_user, ["coi", "attach", ""])
    session_user.run(["kill", name])


def test_fish_script(session_user):
    proc = session_user.run(["completion", "fish"])
    assert proc.returncode == 0 and "complete -c coi" in proc.stdout
