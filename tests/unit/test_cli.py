"""The CLI's top level: parsing, errors without tracebacks, exit codes."""

from __future__ import annotations

import pytest

from coi.cli import main as cli_main
from coi.cli.main import _parse, main
from coi.cli.parser import build_parser, normalise

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("args, command", [
    (["container", "exec", "X", "--user", "1000", "--", "sh", "-c", "id"], ["sh", "-c", "id"]),
    (["run", "--", "sh", "-c", "id"], ["sh", "-c", "id"]),
    (["run", "make", "--", "x"], ["make", "--", "x"]),
    (["run", "--slot", "2", "--", "a", "--", "b"], ["a", "--", "b"]),
    (["run", "make", "test"], ["make", "test"]),
])
def test_commands_after_double_dash_are_verbatim(args, command):
    assert _parse(build_parser(), args, normalise).command == command


@pytest.mark.parametrize("args, resume", [
    (["shell", "--resume"], "latest"), (["shell", "--continue"], "latest"),
    (["shell", "--resume=abc"], "abc"), (["shell"], None),
])
def test_resume_needs_equals_for_an_id(args, resume):
    assert _parse(build_parser(), args, normalise).resume == resume


@pytest.mark.parametrize("args", [["--version"], ["-v"], ["version"], ["version", "--short", "extra"]])
def test_version_names_code_on_incus_then_python(args, capsys):
    assert main(args) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("code-on-incus (coi) v0.") and second.startswith("Python 3.")


def test_help_has_the_familiar_sections(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("Usage: coi ") and "\nFlags:\n" in out and "\nAvailable Commands:\n" in out
    assert "code-on-incus" in out
    with pytest.raises(SystemExit):
        main(["image", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("Usage: coi image ") and "\nAvailable Commands:\n" in out


def test_unexpected_failures_are_one_line(monkeypatch, capsys):
    def boom(ref):
        raise OSError(5, "disk on fire")
    monkeypatch.setattr(cli_main, "_resolve", boom)
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error: unexpected failure: OSError" in err and "--debug-traceback" in err
    monkeypatch.setenv("COI_DEBUG", "1")
    assert main(["doctor"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "Error: argument COMMAND: invalid choice" in capsys.readouterr().err


def test_every_command_has_help_with_an_example():
    parser = build_parser()
    from coi.cli.completion import command_table
    for path in command_table(parser):
        if not path:
            continue
        p = parser
        for word in path.split():
            p = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
        text = p.format_help()
        assert "example:" in text and p.description, path


@pytest.mark.parametrize("args", [["list", "--format", "yaml"], ["image", "list", "--format", "xml"],
                                  ["doctor", "--format", "csv"], ["config", "show", "--format", "ini"],
                                  ["container", "exec", "c", "--capture", "--format", "text", "--", "true"],
                                  ["shell", "--format", "yaml"]])
def test_an_unknown_format_is_a_usage_error_everywhere(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "Error: argument --format: invalid choice" in capsys.readouterr().err


def test_json_output_of_shell_needs_background(capsys):
    assert main(["shell", "--format", "json"]) == 2
    assert "--format json needs --background" in capsys.readouterr().err


def test_argparse_is_left_as_it_was():
    import argparse

    before = argparse._  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert argparse._ is before  # type: ignore[attr-defined]
