"""Declared workflow parameters (`params`) against a run's `KEY=VALUE` variables.

Pure core. A workflow that declares no params takes any variables, as before.
One that declares some takes only those: a name it does not declare is an
error (a typo would otherwise be silently ignored), with the closest declared
name as a suggestion; a required param not given is an error; a param not
given takes its `default`, and one without a default is left unset. The
result is the run's variables, recorded in its `RunCreated` (so the log says
what each step got) and given to every step above every level of `env`, as
any variable.
"""

from __future__ import annotations

import difflib

from wfd.errors import UsageError
from wfd.workflow import Workflow


def resolve_vars(wf: Workflow, given: dict[str, str]) -> dict[str, str]:
    """The run's variables: `given`, checked against `wf.params`, with defaults filled
    in. UsageError naming every problem (one `; `-separated line)."""
    params = wf.params
    if not params:
        return dict(given)
    problems = [_unknown(name, wf) for name in given if name not in params]
    problems += [f"missing required param {name!r} (wfctl run FILE {name}=VALUE)"
                 for name, param in params.items() if param.required and name not in given]
    if problems:
        raise UsageError("; ".join(problems))
    resolved = {name: param.default for name, param in params.items()
                if name not in given and param.default is not None}
    resolved.update(given)
    return resolved  # type: ignore[return-value]


def _unknown(name: str, wf: Workflow) -> str:
    close = difflib.get_close_matches(name, list(wf.params), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown param {name!r}{hint}; workflow {wf.name!r} declares "
            f"{', '.join(wf.params)}")
