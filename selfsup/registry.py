"""Name -> callable registries with did-you-mean errors and signature-checked construction."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''.

    Besides spelling, an abbreviation counts: 'learning_rate' suggests 'lr'.
    """
    close = difflib.get_close_matches(name, valid, n=1)
    if not close:
        initials = "".join(word[:1] for word in name.split("_"))
        close = [v for v in valid if v == initials] or [
            v for v in valid if len(v) > 2 and (v in name or name in v)
        ]
    return f" (did you mean '{close[0]}'?)" if close else ""


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-settable parameters of a callable (a class: its __init__), without self."""
    params = inspect.signature(fn).parameters
    return {
        name: p
        for name, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    }


class Registry:
    """Maps names to callables (factories or classes); `build({"name": ..., **kw})` calls one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def add(self, name: str, fn: Callable, doc: str) -> Callable:
        """Register a generated factory `fn` under `name`, naming and documenting it."""
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = doc
        return self.register(name)(fn)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} '{name}'{suggest(name, self.names())}; "
                f"valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def summary(self, name: str) -> str:
        """First line of the entry's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def check_keys(
        self, name: str, keys: list[str], where: str | None = None, hidden: set[str] = frozenset()
    ) -> None:
        """Raise if any key is not a parameter of entry `name`, listing the valid keys.

        `hidden` parameters (those the engine supplies) are neither valid nor listed.
        """
        valid = {k: p for k, p in parameters(self.get(name)).items() if k not in hidden}
        for key in keys:
            if key not in valid:
                prefix = f"{where}." if where else ""
                listing = ", ".join(
                    k if p.default is inspect.Parameter.empty else f"{k}={p.default!r}"
                    for k, p in valid.items()
                )
                raise ValueError(
                    f"unknown key '{prefix}{key}' for {self.kind} '{name}'"
                    f"{suggest(key, list(valid))}; valid: {listing}"
                )

    def build(self, spec: dict[str, Any], *args: Any, **context: Any) -> Any:
        """Call the entry spec["name"] with the other keys of spec as keyword arguments.

        `context` holds values the caller knows (e.g. in_channels from the data); each is passed
        only where the callable has a parameter of that name, and spec's own keys win.
        """
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"{self.kind} spec needs a 'name'; valid: {', '.join(self.names())}")
        name = spec.pop("name")
        fn = self.get(name)
        self.check_keys(name, list(spec))
        accepted = parameters(fn)
        kwargs = {k: v for k, v in context.items() if k in accepted}
        kwargs.update(spec)
        return fn(*args, **kwargs)


BACKBONES = Registry("backbone")
METHODS = Registry("method")
DATASETS = Registry("dataset")
VIEWS = Registry("view preset")
