"""Workflow files in YAML (issue 14): converted to JSON here, in the client; the daemon
never parses YAML.

YAML 1.2 (ruamel.yaml, whose loader follows the 1.2 core schema: `yes` and `on`
are strings, `0o17` is octal), one document, duplicate keys refused. The JSON the
validator sees is the same document, so its problems come back with JSON paths
(`$.steps[2].retries`); `Document.where` maps such a path back to the line and
column of that key or item in the YAML file, so every problem reads
`FILE:LINE:COL: $.steps[2].retries: ...`, as a JSON syntax error names its place.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any

from wfd.errors import WorkflowInvalid

MAX_NODES = 5_000_000  # aliases can multiply a small file (a "billion laughs"): stop here

# One step of a JSON path as the validator writes it: `.key`, `[3]` or `["odd key"]`.
_PATH_STEP = re.compile(r'\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def is_yaml(path: str, data: bytes) -> bool:
    """`.yaml`/`.yml` files; from stdin (`-`), anything that does not start as JSON does."""
    if path == "-":
        return not data.lstrip().startswith((b"{", b"["))
    return path.lower().endswith((".yaml", ".yml"))


class Document:
    """A YAML workflow: its JSON text, and where each of its nodes was written."""

    def __init__(self, data: bytes) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import MarkedYAMLError, YAMLError

        yaml = YAML(typ="rt", pure=True)
        yaml.allow_duplicate_keys = False
        try:
            self.root = yaml.load(data)
        except MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
            what = " ".join(str(e.problem or e.context or "bad YAML").split())
            raise WorkflowInvalid([f"{where}YAML: {what}"]) from None
        except (YAMLError, ValueError) as e:  # not UTF-8, a bad tag...
            raise WorkflowInvalid([f"YAML: {' '.join(str(e).split())}"]) from None
        self.text = json.dumps(_plain(self.root), ensure_ascii=False)

    def where(self, problem: str) -> str:
        """`LINE:COL: problem` for a problem that starts with a JSON path (the deepest
        node of the path the document has); the problem alone otherwise."""
        if not problem.startswith("$"):
            return problem
        node, line, col = self.root, 0, 0
        pos = 1
        while True:
            match = _PATH_STEP.match(problem, pos)
            if match is None:
                break
            key: Any = match.group(1) or (json.loads(match.group(3)) if match.group(3)
                                          else int(match.group(2)))
            found = _position(node, key)
            if found is None:
                break
            node, line, col = found
            pos = match.end()
        return f"{line + 1}:{col + 1}: {problem}"


def _position(node: Any, key: Any) -> tuple[Any, int, int] | None:
    """The child `key` of a YAML mapping or sequence, and where it was written."""
    try:
        if isinstance(key, int) and isinstance(node, list):
            line, col = node.lc.item(key)
        elif isinstance(key, str) and isinstance(node, dict):
            line, col = node.lc.key(key)
        else:
            return None
        return node[key], line, col
    except (KeyError, IndexError, AttributeError, TypeError):
        return None


def _plain(root: Any) -> Any:
    """The document as JSON values (dict, list, str, int, float, bool, None), without
    recursion (a deep file must not overflow the stack) and within MAX_NODES."""
    out: list[Any] = [None]
    todo: list[tuple[Any, Any, Any]] = [(root, out, 0)]
    count = 0
    while todo:
        node, parent, slot = todo.pop()
        count += 1
        if count > MAX_NODES:
            raise WorkflowInvalid([f"YAML: more than {MAX_NODES} values once its aliases "
                                   "are expanded"])
        if isinstance(node, dict):
            made: Any = {}
            for key, value in node.items():
                made[_key(key)] = None
                todo.append((value, made, _key(key)))
        elif isinstance(node, list):
            made = [None] * len(node)
            todo.extend((value, made, i) for i, value in enumerate(node))
        else:
            made = _scalar(node)
        parent[slot] = made
    return out[0]


def _key(key: Any) -> str:
    """A mapping key as JSON has it: a string (YAML allows `1: x`; JSON writes "1")."""
    if isinstance(key, str):
        return str(key)
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    return str(key)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)  # JSON has no .inf
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()  # a timestamp-looking value: the validator judges it
    return str(value)
