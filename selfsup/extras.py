"""The optional extras (pyproject.toml's optional-dependencies): whether a library is installed,
and the one error that names the extra to install when a command needs a missing one.

Checked where a command starts, before anything is built or trained: a run that logs to MLflow
stops at once without it, not after an hour of training.
"""

from __future__ import annotations

import importlib.util


def missing(*modules: str) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require(extra: str, modules: tuple[str, ...], needed_by: str, instead: str = "") -> None:
    """ModuleNotFoundError unless every module is installed: what needs which missing modules,
    the extra that installs them, and `instead` (another way out) in brackets when given."""
    absent = missing(*modules)
    if absent:
        other = f" ({instead})" if instead else ""
        raise ModuleNotFoundError(
            f"{needed_by} needs {' and '.join(absent)}, which is not installed: "
            f'pip install "selfsup[{extra}]"{other}'
        )
