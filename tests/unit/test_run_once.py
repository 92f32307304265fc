"""The run-once guard (data/run-once.sh), run by the host's sh as it runs in a container:
a command behind it never starts twice, whatever Incus asks."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from coi.sessions import commands

pytestmark = pytest.mark.unit


def guarded(marker, *command: str, terminal: bool = False) -> list[str]:
    argv = commands.once_argv(list(command), terminal=terminal)
    argv[3] = str(marker)  # the marker directory: a test's own
    return argv


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_the_argv_carries_the_script_without_its_comments():
    argv = commands.once_argv(["make", "test"])
    assert argv[:2] == ["sh", "-c"] and argv[2] == commands.guard_script()
    assert argv[3].startswith("/tmp/.coi-run-") and argv[4:] == ["recorded", "make", "test"]
    assert commands.once_argv(["x"], terminal=True)[4] == "terminal"
    assert not [line for line in argv[2].splitlines() if line.lstrip().startswith("#")]


def test_the_guard_writes_the_lines_coi_looks_for():
    text = commands.GUARD.read_text()
    assert commands._LOST in text and commands._RECOVERED in text


@pytest.mark.parametrize("rc", [0, 3, 124])
def test_a_second_start_recovers_the_status_and_never_runs_again(tmp_path, rc):
    count = tmp_path / "count"
    marker = tmp_path / "m"
    argv = guarded(marker, "sh", "-c", f'echo run >> "{count}"; echo out; exit {rc}')
    first = run(argv)
    assert (first.returncode, first.stdout, first.stderr) == (rc, "out\n", "")
    again = run(argv)
    assert again.returncode == rc and again.stdout == ""
    assert commands.guard_lines(again.stderr) == [commands._RECOVERED]
    assert count.read_text() == "run\n"


def test_a_second_start_waits_for_the_first_to_end(tmp_path):
    marker, gate = tmp_path / "m", tmp_path / "gate"
    argv = guarded(marker, "sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.01; done; exit 7')
    first = subprocess.Popen(argv)
    while not (marker / "pid").exists():
        time.sleep(0.01)
    second = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    gate.touch()
    assert first.wait(timeout=30) == 7
    assert second.wait(timeout=30) == 7
    assert commands._RECOVERED in second.stderr.read()


def test_with_a_terminal_the_command_replaces_the_guard_and_its_status_is_lost(tmp_path):
    marker = tmp_path / "m"
    argv = guarded(marker, "sh", "-c", "exit 5", terminal=True)
    assert run(argv).returncode == 5
    again = run(argv)
    assert again.returncode == 254 and commands.lost_track(again.returncode, again.stderr) is not None


def catches_int(pid: int) -> bool:
    """Whether the guard has set its trap (SIGINT caught, in /proc's SigCgt mask)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def test_a_signal_to_the_guard_ends_the_command(tmp_path):
    marker, child = tmp_path / "m", tmp_path / "child"
    argv = guarded(marker, "sh", "-c", f'echo $$ > "{child}"; exec sleep 60')
    proc = subprocess.Popen(argv)
    while not child.exists() or not child.read_text().strip() or not catches_int(proc.pid):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # passed on as TERM: a background child ignores INT
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert (marker / "rc").read_text().strip() == str(128 + signal.SIGTERM)
