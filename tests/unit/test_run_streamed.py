"""run_streamed against a stand-in for 'incus exec' that loses track of its command once."""

from __future__ import annotations


import pytest

from coi import sessions
from coi.sessions import commands
from coi.errors import OperationFailedError
from coi.incus import EXEC_NOT_STARTED

pytestmark = pytest.mark.unit


def fake_incus(tmp_path, second_start: str, code: int) -> list[str]:
    """First call: the command's output, then Incus's lost-PID error (exit 255);
    second call: what the guard says on a second start."""
    state = tmp_path / "calls"
    script = tmp_path / "incus"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{state}" ]; then touch "{state}"; echo output; echo "Error: {EXEC_NOT_STARTED}" >&2; exit 255; fi\n'
        f'echo "{second_start}" >&2; exit {code}\n')
    script.chmod(0o755)
    return [str(script)]


def test_a_recovered_exit_status_is_returned_with_a_warning(tmp_path, capfd):
    argv = fake_incus(tmp_path, commands._RECOVERED, 42)
    warnings = []
    assert sessions.run_streamed(argv, timeout=10, warn=warnings.append) == 42
    out, err = capfd.readouterr()
    assert out == "output\n"  # the command ran once; its output was shown once
    assert EXEC_NOT_STARTED not in err and commands._RECOVERED not in err
    assert warnings == ["Incus lost track of the command; its exit status was recovered, "
                        "its output may be incomplete"]


def test_an_unknown_exit_status_is_an_error(tmp_path, capfd):
    argv = fake_incus(tmp_path, commands._LOST, 254)
    with pytest.raises(OperationFailedError, match="its result is unknown"):
        sessions.run_streamed(argv, timeout=10, warn=print)


def test_the_command_s_own_stderr_passes_through(tmp_path, capfd):
    script = tmp_path / "incus"
    script.write_text("#!/bin/sh\necho 'real error' >&2; exit 3\n")
    script.chmod(0o755)
    assert sessions.run_streamed([str(script)], timeout=10, warn=print) == 3
    assert capfd.readouterr().err == "real error\n"


def test_a_quick_attach_failure_is_tried_once_more(tmp_path):
    """tmux attach that Incus failed to start (it exits at once) is run again, once."""
    counter = tmp_path / "count"
    script = tmp_path / "attach"
    script.write_text(f'#!/bin/sh\necho x >> {counter}\n[ "$(wc -l < {counter})" -ge 2 ] && exit 0\nexit 1\n')
    script.chmod(0o755)
    assert sessions.run_attached([str(script)], again_if_lost=True) == 0
    assert counter.read_text().count("x") == 2
    counter.unlink()
    assert sessions.run_attached([str(script)]) == 1  # bash and the like: never twice
