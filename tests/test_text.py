"""wfd.text.printable, and that what wfctl and the daemon print goes through it."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as hs

from wfctl import render
from wfd import events as ev
from wfd import state as st
from wfd.systemd import JournalFormatter
from wfd.text import CONTROL_RE, printable

TS = "2026-11-25T09:58:52.123456Z"
UNSAFE = "\x00\x07\t\n\r\x1b\x7f\x80\x85\x9b\x9f\u202e\u2066\udcff"


def test_printable_escapes_controls_and_keeps_the_rest() -> None:
    assert printable("plain text, é ü 漢字 🙂") == "plain text, é ü 漢字 🙂"
    assert printable("a\x1b[2Jb\nc\td\re") == "a\\x1b[2Jb\\nc\\td\\re"
    assert printable("\x00\x7f\x85\x9b") == "\\x00\\x7f\\x85\\x9b"
    assert printable("\u202eevil\u2066") == "\\u202eevil\\u2066"
    assert printable("\udcff") == "\\udcff"  # a byte decoded with surrogateescape


@given(hs.text(alphabet=hs.sampled_from(UNSAFE + "ab\\é"), max_size=30) | hs.text())
def test_printable_output_holds_no_control_character_and_can_be_encoded(text: str) -> None:
    shown = printable(text)
    assert not CONTROL_RE.search(shown)
    shown.encode("utf-8")  # no lone surrogate left
    bidi_or_surrogate = any(0xD800 <= ord(c) <= 0xDFFF or 0x202A <= ord(c) <= 0x202E
                            or 0x2066 <= ord(c) <= 0x2069 for c in text)
    if not CONTROL_RE.search(text) and not bidi_or_surrogate:
        assert shown == text


def test_status_tables_escape_names_and_errors() -> None:
    run = st.RunSummary(run_id="r1", name="n\x1b]0;t\x07", owner="me", state="FAILED",
                        created_at=TS, finished_at=TS)
    lines = render.runs_lines([run], None)
    assert "n\\x1b]0;t\\x07" in lines[1]
    assert not any(CONTROL_RE.search(line) for line in lines)


def test_describe_escapes_what_users_chose() -> None:
    text = st.describe(ev.StepFailed(seq=3, ts=TS, step="a", attempt=1, exit_code=None,
                                     error="cannot start: /tmp/x\x1b[2J\nFORGED"))
    assert text == "a: FAILED (attempt 1: cannot start: /tmp/x\\x1b[2J\\nFORGED)"
    assert st.describe(ev.RunCreated(seq=1, ts=TS, run_id="r", name="\x85", owner="o",
                                     owner_uid=0)) == "run created (\\x85, owner o)"


def test_the_daemon_log_keeps_each_message_on_its_line() -> None:
    formatter = JournalFormatter(journal=False)
    record = logging.LogRecord("wfd", logging.INFO, __file__, 1, "run %s: %s", ("r1", "x\nFAKE"),
                               None)
    assert formatter.format(record).endswith(" INFO run r1: x\\nFAKE")
    assert "\n" not in formatter.format(record)
