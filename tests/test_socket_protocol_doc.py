"""docs/protocol.md holds what it says: its raw client works against a live
daemon, and it names every message and every field of wfd/protocol.py."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from helpers import REPO, Daemon, base_env

from wfd import protocol as p

DOC = REPO / "docs" / "protocol.md"


def example_client() -> str:
    text = DOC.read_text()
    marker = text.index("<!-- example-client")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, marker)
    assert match is not None, "no python block after the example-client marker"
    return match.group(1)


def test_the_documented_raw_client_works(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    script = wfd_tmp / "client.py"
    script.write_text(example_client())
    done = subprocess.run([sys.executable, str(script), str(d.socket)], cwd=wfd_tmp,
                          env=base_env(d.mark), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(rf"wfd \S+ \(protocol {p.PROTOCOL}, pid \d+\)", lines[0])
    run_id = lines[1].removeprefix("run ")
    assert d.run_ids() == {run_id}
    assert f"run {run_id} SUCCEEDED" in lines
    assert any(line.startswith("1 RunCreated") for line in lines)
    assert any(line.endswith("AttemptSucceeded greet") for line in lines)
    assert lines[-1] == "hello"


@pytest.mark.parametrize("theirs", [p.PROTOCOL - 1, p.PROTOCOL + 1])
def test_the_documented_client_reports_a_version_mismatch(
        daemon: Callable[..., Daemon], wfd_tmp: Path, theirs: int) -> None:
    """An older client (protocol 1 replies come whole) and a newer one both get a clear
    answer, in the daemon's own version."""
    d = daemon()
    script = wfd_tmp / "client.py"
    script.write_text(example_client().replace(f"PROTOCOL = {p.PROTOCOL}",
                                               f"PROTOCOL = {theirs}"))
    done = subprocess.run([sys.executable, str(script), str(d.socket)], cwd=wfd_tmp,
                          env=base_env(d.mark), capture_output=True, text=True, timeout=60)
    # the daemon answers in its own version; the client sees that in the envelope
    assert done.returncode == 3
    assert done.stderr == f"wfd speaks protocol {p.PROTOCOL}, this client speaks {theirs}\n"


def test_every_message_and_field_is_documented() -> None:
    text = DOC.read_text()
    assert f"now `{p.PROTOCOL}`" in text
    for union in (p.Request, p.Reply):
        for cls in union.__args__:  # type: ignore[attr-defined]
            assert f"| `{cls.__name__}` |" in text, f"{cls.__name__} is not in the tables"
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| `{cls.__name__}` |"))
            for field in cls.__struct_fields__:
                assert f"`{field}`" in row, f"{cls.__name__}.{field} is not documented"
    for struct in ("RunStatus", "RunSummary"):
        fields = msgspec.structs.fields(getattr(sys.modules["wfd.state"], struct))
        for field in fields:
            assert f"`{field.name}`" in text, f"{struct}.{field.name} is not documented"
    assert str(p.MAX_FRAME) in text
