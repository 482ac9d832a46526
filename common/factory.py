"""Build a model from a ``"module.sub:callable"`` path without letting a coordinator run arbitrary code.

A factory path names code that the worker imports and calls, and importing a module runs it. The path arrives
from the coordinator, so a worker must decide whether to trust it *before* any import: :class:`ModelAllowList`
matches the whole ``"module:callable"`` string against the operator's glob patterns, and only then does
:func:`build_model` import anything. The default admits only fedlink's own reference models
(:mod:`fedlink.models`); operators widen it with ``fl-worker --allow-model PATTERN``.

Every failure comes out as :class:`~fedlink.errors.ModelError` (or its subclass
:class:`~fedlink.errors.ModelNotAllowed`) with the original exception chained, so a worker can report it to the
coordinator as one clean message instead of dying on whatever the user's module raised.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .errors import FedlinkError, ModelError, ModelNotAllowed

__all__ = ["DEFAULT_PATTERNS", "FACTORY_RE", "ModelAllowList", "build_model", "parse_factory"]

#: A dotted module path, a colon, and one public attribute name; ASCII only, so that no look-alike Unicode
#: identifier can pass an allow-list pattern written in ASCII. Callables starting with ``_`` are refused: they
#: are not a module's public API, and dunders such as ``__class__`` would otherwise be reachable.
FACTORY_RE = re.compile(
    r"(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
    r":(?P<callable>[A-Za-z][A-Za-z0-9_]*)"
)

#: What a worker accepts when its operator allowed nothing more: fedlink's own reference models.
DEFAULT_PATTERNS: tuple[str, ...] = ("fedlink.models:*",)

_EXPECTED_FORM = "'package.module:callable', e.g. 'fedlink.models:mnist_cnn'"

# Factory kwargs come from the network; keep them from flooding a log line or an error message sent back.
_short = reprlib.Repr()
_short.maxdict = 16
_short.maxlist = 8
_short.maxstring = 80
_short.maxother = 80


def parse_factory(path: str) -> tuple[str, str]:
    """Split a factory path into ``(module, callable)``, refusing anything that is not exactly that form.

    Raises :class:`ModelError` naming the value and the expected form, so the operator can fix the config.
    """
    if not isinstance(path, str):
        raise ModelError(f"model factory must be a string of the form {_EXPECTED_FORM}, got {_short.repr(path)}")
    match = FACTORY_RE.fullmatch(path)
    if match is None:
        raise ModelError(f"malformed model factory {_short.repr(path)}: expected {_EXPECTED_FORM}")
    return match["module"], match["callable"]


class ModelAllowList:
    """The operator's glob patterns (``fnmatch``, case-sensitive) over full ``"module:callable"`` strings.

    Patterns are matched against the whole string, so ``"mylab.models:*"`` admits every callable of that one
    module, and ``"mylab.*"`` also every submodule of ``mylab``: write them as narrowly as the trust intended.
    """

    def __init__(self, patterns: Iterable[str] = DEFAULT_PATTERNS) -> None:
        if isinstance(patterns, str):
            # A bare string would otherwise be iterated character by character into one-letter patterns.
            patterns = (patterns,)
        checked: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ModelError(f"allow-list pattern must be a non-empty string, got {_short.repr(pattern)}")
            checked.append(pattern.strip())
        self.patterns: tuple[str, ...] = tuple(checked)

    def __repr__(self) -> str:
        return f"ModelAllowList({list(self.patterns)!r})"

    def allows(self, path: str) -> bool:
        """Whether ``path`` is well formed and matches a pattern; never imports anything."""
        try:
            parse_factory(path)
        except ModelError:
            return False
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.patterns)

    def check(self, path: str) -> None:
        """Raise unless ``path`` may be imported; call it before anything touches ``importlib``.

        Raises :class:`ModelError` for a malformed path and :class:`ModelNotAllowed` for one outside the
        patterns; the latter's message tells the operator which flag would admit it.
        """
        parse_factory(path)
        if not self.allows(path):
            shown = ", ".join(repr(p) for p in self.patterns) or "(none)"
            raise ModelNotAllowed(
                f"model factory {path!r} is not allowed by this worker (allowed patterns: {shown}); "
                f"nothing was imported. To trust it, start the worker with `fl-worker --allow-model {path!r}` "
                f"or a wider glob such as `--allow-model {path.split(':', 1)[0] + ':*'!r}`."
            )


def build_model(factory: str, kwargs: Mapping[str, Any], allow: ModelAllowList) -> nn.Module:
    """Check ``factory`` against ``allow``, then import it and call it with ``kwargs``.

    The allow-list check comes first, so a refused factory's module is never imported. Anything that goes
    wrong afterwards (the import, the attribute, the call, a result that is not a ``torch.nn.Module``) becomes
    a :class:`ModelError` naming the factory and kwargs, chained to the original exception.
    """
    allow.check(factory)
    module_name, attr = parse_factory(factory)
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise ModelError(f"kwargs for model factory {factory!r} must map names to values, got {_short.repr(kwargs)}")
    arguments = dict(kwargs)
    where = f"model factory {factory!r} with kwargs {_short.repr(arguments)}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the module: any error in it is the factory's failure
        raise ModelError(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        make = getattr(module, attr)
    except AttributeError as exc:
        raise ModelError(f"{where}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(make):
        raise ModelError(f"{where}: {attr!r} is a {type(make).__name__}, not a callable")
    try:
        model = make(**arguments)
    except FedlinkError:  # a limit of ours stopped the build (a worker's --max-state-mb): keep its own code
        raise
    except Exception as exc:  # the factory is user code; TypeError (bad kwargs) is only the most common failure
        raise ModelError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
