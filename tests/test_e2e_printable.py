"""Control characters never reach a terminal or the daemon's log raw (issue 11 finding 10).

Validation refuses them where a value is only a name (`name`, `cwd`, env names:
tests/test_e2e_validation.py). What may still carry them is printed escaped: a
run named after its file, and an error quoting the workflow's own directory
(both chosen by the user). Through the real `wfd` and `wfctl`: `run --follow`,
`status`, `replay` and the daemon's log show `\\x1b` and `\\n`, never an ESC
sequence or a line the user forged.
"""

from __future__ import annotations

from pathlib import Path

from helpers import run_json, wait_for_state, write_workflow

FORGED = "FORGED wfd[1] ERROR pwned"
DIR_NAME = f"d\x1b[2J\n{FORGED}"
FILE_NAME = "evil\x1b]0;title\x07\u0085.json"


def raw_controls(text: str) -> list[str]:
    """Control characters in `text` other than the newlines between lines."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]


def forged_lines(text: str) -> list[str]:
    """Lines that the user's text began: a newline of theirs reached the output."""
    return [line for line in text.splitlines() if line.startswith(FORGED)]


def test_names_and_errors_are_escaped_in_status_replay_follow_and_the_log(
        daemon, wfd_tmp: Path) -> None:
    d = daemon()
    where = wfd_tmp / DIR_NAME
    where.mkdir()
    # The step's cwd is relative: it resolves against the directory named above, which
    # does not hold it, so the attempt fails with an error quoting "<that path>/missing".
    wf = write_workflow(where, {"steps": [{"id": "a", "command": "true", "cwd": "missing"}]},
                        FILE_NAME)
    done = d.wfctl("run", "--follow", str(wf))
    assert done.returncode == 1, done.stderr
    run_id = done.stdout.strip()
    status = wait_for_state(d, run_id, "FAILED")
    assert f"\x1b[2J\n{FORGED}/missing" in status["steps"]["a"]["error"], status  # JSON: raw

    shown = {
        "run --follow": done.stderr,
        "status": d.wfctl("status").stdout,
        "status RUN": d.wfctl("status", run_id).stdout,
        "replay": d.wfctl("replay", run_id).stdout,
    }
    for what, text in shown.items():
        assert not raw_controls(text), (what, text)
        assert not forged_lines(text), (what, text)
    assert "evil\\x1b]0;title\\x07\\x85" in shown["status"], shown["status"]
    for what in ("run --follow", "status RUN", "replay"):
        assert "d\\x1b[2J" in shown[what], (what, shown[what])
    assert "\\x1b[2J\\n" + FORGED in shown["replay"], shown["replay"]

    log = d.log_text()
    assert f"\\x1b[2J\\n{FORGED}/missing" in log, log
    assert not raw_controls(log), log
    assert not forged_lines(log), log
    assert run_json(d, run_id)["state"] == "FAILED"
