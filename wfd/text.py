"""Text that is safe to print: control characters shown, never sent raw.

Pure core. Names, directories and error messages come from users (a `cwd`
with an ESC sequence, a file name with a newline) and end up on terminals
(`wfctl status`, `replay`, `--follow`) and in the daemon's log, where a raw
newline forges a log line and an ESC sequence rewrites someone else's screen.
Validation refuses control characters where a value is only a name; what may
still hold them (error texts quoting a path, a command) goes through
`printable` on its way out.
"""

from __future__ import annotations

import re

__all__ = ["CONTROL_RE", "printable"]

# C0 (NUL .. US), DEL and C1 (U+0080 .. U+009F): a terminal acts on each of them.
CONTROL_RE: re.Pattern[str] = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Also escaped when printed, though not refused anywhere: lone surrogates (text
# decoded with surrogateescape; printing one raises UnicodeEncodeError) and the
# bidirectional overrides and isolates that reorder what a reader sees.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    char = m.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character (and bidi override, lone surrogate)
    written as a Python-style escape, e.g. `\\x1b`, `\\n`, `\\x85`; the rest as is."""
    if _UNSAFE.search(text) is None:  # the common case: no copy
        return text
    return _UNSAFE.sub(_escape, text)
