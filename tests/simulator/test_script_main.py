"""The simulator's refit and replay scripts answer bad input in one line (exit 2); their own bugs keep tracebacks."""

from __future__ import annotations

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.script_main import run_script


@pytest.mark.parametrize("error, says", [
    (InvalidArgumentError("no calibration 'x'", param="calibration"), "error: no calibration 'x'"),
    (FileNotFoundError(2, "No such file or directory", "trace.jsonl"), "error: FileNotFoundError: [Errno 2]"),
])
def test_bad_input_is_one_line_and_exit_2(error, says, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_script(main, "meshserve.simulator.step_noise")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m meshserve.simulator.step_noise: ") and says in err


def test_a_scripts_own_bug_keeps_its_traceback():
    def main():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_script(main, "meshserve.simulator.step_noise")


def test_the_hang_and_overload_replay_refuses_an_unknown_table():
    from meshserve.simulator.validation_hang_overload import main

    with pytest.raises(InvalidArgumentError, match="expected one of all, hung, overload"):
        main(["hnug"])
