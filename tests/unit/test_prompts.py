"""Headless runs' prompts: ``[prompts]`` in config, the choice between --prompt,
--prompt-file and --prompt-name, the checks on a prompt and on a prompt file, and the
command line's usage errors (all before anything exists)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from coi.cli.main import main
from coi.config import load_config, render_toml, to_json
from coi.errors import CoiError, ConfigError, NotFoundError, UsageError
from coi.sessions import prompts
from coi.sessions.prompts import MAX_BYTES

pytestmark = pytest.mark.unit


class Files:
    """The system, user and workspace config files of one test (never the real ones)."""

    def __init__(self, root: Path) -> None:
        self.system = root / "etc" / "config.toml"
        self.home = root / "home"
        self.user = self.home / ".config" / "coi" / "config.toml"
        self.workspace = root / "project"
        for path in (self.system.parent, self.user.parent, self.workspace):
            path.mkdir(parents=True, exist_ok=True)

    def load(self, *, system: str = "", user: str = "", workspace: str | None = None):
        self.system.write_text(system)
        self.user.write_text(user)
        if workspace is not None:
            (self.workspace / ".coi.toml").write_text(workspace)
        return load_config(workspace=self.workspace, env={"HOME": str(self.home)}, system_file=self.system,
                           user_file=self.user)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def choose(files: Files, loaded=None, **kw):
    args = dict(text=None, file=None, name=None, command=[])
    args.update(kw)
    return prompts.choose(loaded=loaded or files.load(), workspace=files.workspace, **args)


# ---- [prompts] in config -------------------------------------------------------------

def test_prompts_merge_per_name_across_layers_and_keep_their_origin(files):
    loaded = files.load(system='[prompts]\nreview = "system review"\nlint = "lint it"\n',
                        user='[prompts]\nreview = """Review\nthe diff"""\n')
    assert loaded.config.prompts == {"review": "Review\nthe diff", "lint": "lint it"}
    assert loaded.origins["prompts.review"] == str(files.user)
    assert loaded.origins["prompts.lint"] == str(files.system)
    assert to_json(loaded)["config"]["prompts"] == {"review": "Review\nthe diff", "lint": "lint it"}
    assert f'review = "Review\\nthe diff"  # from {files.user}' in render_toml(loaded)


@pytest.mark.parametrize("text, message", [
    ('[prompts]\n"no spaces" = "x"\n', 'prompt name "no spaces" is not allowed'),
    ('[prompts]\nreview = 3\n', "prompts.review = 3 is not allowed; use a string"),
    ('[prompts.review]\ntext = "x"\n', "prompts.review = "),
    ('prompts = "x"\n', "use a table ([prompts])"),
])
def test_bad_prompts_in_config_are_refused(files, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        files.load(user=text)


# ---- one prompt, and no command with it ------------------------------------------------

def test_no_prompt_flag_is_a_command_run(files):
    assert choose(files, command=["make"]) is None


@pytest.mark.parametrize("kw, message", [
    ({"text": "a", "file": "f"}, "--prompt and --prompt-file exclude each other"),
    ({"text": "a", "name": "n"}, "--prompt and --prompt-name exclude each other"),
    ({"file": "f", "name": "n"}, "--prompt-file and --prompt-name exclude each other"),
    ({"text": "a", "file": "f", "name": "n"}, "--prompt and --prompt-file and --prompt-name exclude"),
    ({"text": "a", "command": ["make", "test"]}, "a command ('make') cannot be given with it"),
    ({"name": "review", "command": ["ls"]}, "--prompt-name runs the agent"),
    ({"text": ""}, "the --prompt text is empty"),
    ({"text": " \n\t"}, "the --prompt text is empty"),
    ({"text": "a\0b"}, "has a NUL character"),
    ({"text": "\udcff"}, "is not UTF-8 text"),
    ({"text": "x" * (MAX_BYTES + 1)}, f"is {MAX_BYTES + 1} bytes; a prompt may have at most {MAX_BYTES}"),
])
def test_bad_prompt_flags_are_usage_errors(files, kw, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose(files, **kw)


def test_the_text_is_taken_as_it_is(files):
    text = "it's \"$(rm -rf /)\" `id`\n--help\n" + "é" * 1000
    assert choose(files, text=text) == prompts.Prompt(text, "")
    assert choose(files, text="x" * MAX_BYTES).text == "x" * MAX_BYTES  # the limit itself is fine


def test_a_named_prompt_says_where_it_came_from(files):
    loaded = files.load(user='[prompts]\nreview = "Review the diff"\n')
    assert choose(files, loaded, name="review") == prompts.Prompt("Review the diff", f"review from {files.user}")


@pytest.mark.parametrize("user, hint", [
    ('[prompts]\nreview = "r"\nfix = "f"\n', "defined prompts: fix, review"),
    ("", 'define one in your config: [prompts] NAME = "..."'),
])
def test_an_unknown_prompt_name_lists_the_known_ones(files, user, hint):
    with pytest.raises(UsageError, match="unknown prompt 'nope'") as exc:
        choose(files, files.load(user=user), name="nope")
    assert exc.value.hint == hint


def test_a_named_prompt_over_the_limit_is_a_config_error(files):
    loaded = files.load(user=f'[prompts]\nbig = "{"x" * (MAX_BYTES + 1)}"\n')
    with pytest.raises(ConfigError, match=f"prompt big \\(in {files.user}\\) is {MAX_BYTES + 1} bytes"):
        choose(files, loaded, name="big")


# ---- prompt files ----------------------------------------------------------------------

def test_a_prompt_file_is_read(files):
    (files.workspace / "task.md").write_text("Fix the tests\n")
    os.chdir(files.workspace)
    assert choose(files, file="task.md") == prompts.Prompt("Fix the tests\n", "file task.md")


def test_standard_input_is_read_for_a_dash(files):
    assert choose(files, file="-", stdin=io.BytesIO(b"from a pipe")) == prompts.Prompt("from a pipe", "standard input")
    with pytest.raises(CoiError, match="the prompt on standard input is over"):
        choose(files, file="-", stdin=io.BytesIO(b"x" * (MAX_BYTES + 1)))


@pytest.mark.parametrize("make, error, message", [
    (lambda p: None, NotFoundError, "does not exist"),
    (lambda p: p.mkdir(), CoiError, "is a directory, not a file"),
    (lambda p: p.write_bytes(b"x" * (MAX_BYTES + 1)), CoiError, f"is {MAX_BYTES + 1} bytes"),
    (lambda p: p.write_bytes(b""), CoiError, "is empty"),
    (lambda p: p.write_bytes(b"\xff\xfe"), CoiError, "is not UTF-8 text"),
    (lambda p: p.write_bytes(b"a\0b"), CoiError, "has a NUL character"),
])
def test_bad_prompt_files_are_refused(files, make, error, message):
    path = files.workspace / "task.md"
    make(path)
    with pytest.raises(error, match=message) as exc:
        choose(files, file=str(path))
    assert str(path) in exc.value.message


def test_an_endless_file_is_read_only_to_the_limit(files):
    with pytest.raises(CoiError, match="is over 102400 bytes"):
        choose(files, file="/dev/zero")


def test_an_unreadable_prompt_file_is_a_clear_error(files):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = files.workspace / "task.md"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(CoiError, match="cannot read prompt file .*: Permission denied"):
        choose(files, file=str(path))


def test_links_inside_the_workspace_are_followed_and_the_users_own_files_read(files, tmp_path):
    (files.workspace / "docs").mkdir()
    (files.workspace / "docs" / "task.md").write_text("inside")
    (files.workspace / "task.md").symlink_to("docs/task.md")
    assert choose(files, file=str(files.workspace / "task.md")).text == "inside"
    mine = tmp_path / "my-prompts" / "review.md"
    mine.parent.mkdir()
    mine.write_text("my own")
    (tmp_path / "review-link.md").symlink_to(mine)
    assert choose(files, file=str(tmp_path / "review-link.md")).text == "my own"  # not in the project


# ---- the command line ------------------------------------------------------------------

@pytest.fixture
def cli(tmp_path, monkeypatch):
    """coi's command line with a home and a workspace of the test's own; no Incus is reachable."""
    home = tmp_path / "home"
    (home / ".config" / "coi").mkdir(parents=True)
    (home / ".config" / "coi" / "config.toml").write_text('[prompts]\nreview = "Review the diff"\n')
    workspace = tmp_path / "project"
    workspace.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("INCUS_SOCKET", str(tmp_path / "no-incus.socket"))
    monkeypatch.chdir(workspace)
    return workspace


@pytest.mark.parametrize("args, code, message", [
    (["run", "--prompt", "a", "--prompt-name", "review"], 2, "--prompt and --prompt-name exclude each other"),
    (["run", "--prompt", "a", "--", "make"], 2, "cannot be given with it"),
    (["run", "--prompt-name", "nope"], 2, "unknown prompt 'nope'"),
    (["run", "--prompt-file", "missing.md"], 1, "prompt file missing.md does not exist"),
    (["run", "--prompt", ""], 2, "the --prompt text is empty"),
    (["run"], 2, "no command given"),
])
def test_usage_errors_come_before_anything_exists(cli, capsys, args, code, message):
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (cli.parent / "home" / ".coi").exists()  # not even coi's state directory


def test_an_unknown_name_hint_lists_the_known_prompts(cli, capsys):
    main(["run", "--prompt-name", "nope"])
    assert "Hint: defined prompts: review" in capsys.readouterr().err


def test_a_prompt_that_looks_like_a_flag_is_given_with_equals(cli):
    from coi.cli.main import _parse
    from coi.cli.parser import build_parser, normalise

    ns = _parse(build_parser(), ["run", "--prompt=--help me"], normalise)
    assert ns.prompt == "--help me" and ns.command == []


def test_completion_offers_prompt_names(cli, capsys):
    assert main(["__complete", "prompts"]) == 0
    assert capsys.readouterr().out.split() == ["review"]


def test_run_help_names_the_prompt_flags(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--prompt TEXT" in out and "--prompt-file FILE" in out and "--prompt-name NAME" in out
    assert "coi shell --resume" in out


def _bash_complete(cli, words: list[str]) -> set[str]:
    """What coi's bash completion offers for ``words``; ``coi`` is this checkout's, run as a function."""
    import shlex
    import subprocess

    from coi.cli.completion import bash
    from coi.cli.parser import build_parser

    script = (_coi_function("bash") + bash(build_parser()) + "\nCOMP_WORDS=("
              + " ".join(shlex.quote(w) for w in words) + ")\n"
              f"COMP_CWORD={len(words) - 1}; _coi; printf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=cli)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_bash_completes_prompt_names_after_the_flag(cli):
    with open(cli.parent / "home" / ".config" / "coi" / "config.toml", "a") as fh:
        fh.write('fix = "Fix it"\n')
    assert _bash_complete(cli, ["coi", "run", "--prompt-name", ""]) == {"review", "fix"}
    assert _bash_complete(cli, ["coi", "run", "--prompt-name", "re"]) == {"review"}
    assert _bash_complete(cli, ["coi", "run", "--prompt-name=f"]) == {"--prompt-name=fix"}
    assert {"--prompt", "--prompt-file", "--prompt-name"} <= _bash_complete(cli, ["coi", "run", "--pro"])


def _coi_function(shell: str) -> str:
    import shlex
    import sys

    src = Path(__file__).resolve().parents[2] / "src"
    run = f"env PYTHONPATH={shlex.quote(str(src))} {shlex.quote(sys.executable)} -m coi"
    return f"function coi; {run} $argv; end\n" if shell == "fish" else f'coi() {{ {run} "$@"; }}\n'


def test_zsh_and_fish_complete_prompt_names_too(cli):
    import shutil
    import subprocess

    from coi.cli.completion import fish, zsh
    from coi.cli.parser import build_parser

    if shutil.which("zsh"):
        script = (_coi_function("zsh") + 'compadd() { print -r -- "$@" }; compdef() {}; _files() {}; compset() {}\n'
                  + zsh(build_parser()) + "\nwords=(coi run --prompt-name ''); CURRENT=4; _coi\n")
        proc = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True, timeout=60, cwd=cli)
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) - {"--"} == {"review"}
    if shutil.which("fish"):
        script = _coi_function("fish") + fish(build_parser()) + "\ncomplete -C 'coi run --prompt-name '\n"
        proc = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=cli)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["review"]
