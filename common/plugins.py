"""Third-party code a worker runs only with its operator's consent: training hooks and stage handlers.

A round may name a hook or a stage handler by ``module:Class`` path. The path arrives from the coordinator, and
importing a module runs it, so the worker checks the path against the operator's ``--allow-plugin`` glob patterns
*before* any import, exactly as :mod:`.factory` does for model factories. Nothing is allowed by default.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterable
from typing import TypeVar

from .errors import FedlinkError
from .factory import parse_factory
from .errors import ModelError

__all__ = ["PluginError", "PluginNotAllowed", "PluginAllowList", "load_plugin"]

T = TypeVar("T")


class PluginError(FedlinkError):
    """A plugin path is malformed, cannot be imported, or is not the kind of object asked for."""

    code = "plugin_error"


class PluginNotAllowed(PluginError):
    """The plugin is outside the operator's allow-list; nothing was imported."""

    code = "plugin_not_allowed"


class PluginAllowList:
    """The operator's glob patterns (``fnmatch``, case-sensitive) over full ``"module:Class"`` strings."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        if isinstance(patterns, str):
            patterns = (patterns,)
        checked = []
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise PluginError(f"plugin allow-list pattern must be a non-empty string, got {pattern!r}")
            checked.append(pattern.strip())
        self.patterns: tuple[str, ...] = tuple(checked)

    def __repr__(self) -> str:
        return f"PluginAllowList({list(self.patterns)!r})"

    def __hash__(self) -> int:
        return hash(self.patterns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PluginAllowList) and other.patterns == self.patterns

    def check(self, path: str, *, what: str = "plugin") -> None:
        """Raise unless ``path`` may be imported; the refusal names the flag that would admit it."""
        try:
            parse_factory(path)
        except ModelError as exc:
            raise PluginError(f"malformed {what} path {path[:80]!r}: expected 'package.module:Class'") from exc
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in self.patterns):
            shown = ", ".join(repr(p) for p in self.patterns) or "none"
            raise PluginNotAllowed(
                f"{what} {path!r} is not allowed by this worker (allowed plugins: {shown}); nothing was imported. "
                f"To trust it, start the worker with `fl-worker --allow-plugin {path!r}` "
                f"or a wider glob such as `--allow-plugin {path.split(':', 1)[0] + ':*'!r}`."
            )


def load_plugin(path: str, allow: PluginAllowList, base: type[T], *, what: str = "plugin") -> type[T]:
    """The class at ``path``, after the allow-list check, as long as it subclasses ``base``."""
    allow.check(path, what=what)
    module_name, attr = parse_factory(path)
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # importing runs the module: any error in it is the plugin's failure
        raise PluginError(f"{what} {path!r}: cannot import: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, base)):
        raise PluginError(f"{what} {path!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return found
