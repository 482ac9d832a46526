"""The source stays free of the ways input becomes code: pickle, ``torch.load`` without ``weights_only=True``,
``eval``/``exec``, ``allow_pickle=True``, unsafe YAML loaders, and unbounded WebSocket messages (``max_size=None``).

The check reads the syntax tree (``ast``), so a mention in a docstring or comment is fine and an aliased import
(``import pickle as p``, ``from torch import load``) is still caught. The checker is itself tested on snippets, so
that it cannot silently pass everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("protocol", "worker", "server", "common")

#: Modules that deserialise into arbitrary objects (or run code) when given bytes.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe construct in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> what it was imported as, e.g. p -> pickle, load -> torch.load
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {alias.name}")
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                report(node, f"imports from {node.module}")
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if alias.name in UNSAFE_CALLS and node.module == "builtins":
                    report(node, f"imports {alias.name} from builtins")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases[head]}.{rest}".strip(".") if head in aliases else name
        if name in UNSAFE_CALLS or full in {f"builtins.{c}" for c in UNSAFE_CALLS}:
            report(node, f"calls {name}()")
        if full.split(".")[0] in UNSAFE_MODULES:
            report(node, f"calls {full}()")
        if full == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            report(node, "calls torch.load without weights_only=True")
        if full.startswith("yaml.") and full.split(".", 1)[1] in UNSAFE_YAML:
            loader = _dotted(_keyword(node, "Loader") or ast.Constant(None))
            if not loader.endswith("SafeLoader"):
                report(node, f"calls {full} without a SafeLoader (use yaml.safe_load)")
        if _is_const(_keyword(node, "allow_pickle"), True):
            report(node, "passes allow_pickle=True")
        for limit in ("max_size", "max_queue", "max_message_size"):
            if _is_const(_keyword(node, limit), None):
                report(node, f"passes {limit}=None (unbounded)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):  # options gathered in a dict, then splatted into a call
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("max_size", "max_queue") and _is_const(value, None):
                    report(node, f"sets {key.value!r}: None (unbounded)")
                if isinstance(key, ast.Constant) and key.value == "allow_pickle" and _is_const(value, True):
                    report(node, "sets 'allow_pickle': True")
    return found


def _sources() -> list[Path]:
    files = sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 40, f"expected the whole package under {SCANNED}, found {len(files)} files"
    return files


def test_the_source_has_no_unsafe_deserialisation_or_code_execution() -> None:
    found = [problem for path in _sources() for problem in problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as p\np.loads(b'')",
        "from pickle import loads",
        "import cloudpickle",
        "import dill.source",
        "from marshal import loads",
        "import torch\ntorch.load('m.pt')",
        "import torch\ntorch.load('m.pt', weights_only=False)",
        "from torch import load\nload('m.pt')",
        "import torch as t\nt.load(f, map_location='cpu')",
        "eval('1 + 1')",
        "exec(code)",
        "import builtins\nbuiltins.eval('x')",
        "from builtins import exec as run",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "serve(handler, max_size=None)",
        "connect(url, max_queue=None)",
        "OPTIONS = {'max_size': None}",
    ],
)
def test_the_checker_catches(snippet: str) -> None:
    assert problems(snippet), f"not caught: {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        "model.eval()",
        "import torch\ntorch.load('m.pt', weights_only=True)",
        "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "serve(handler, max_size=2**20)",
        '"""Never use pickle.loads or eval() on input."""',
        "# import pickle",
        "x = {'max_size': 4096}",
    ],
)
def test_the_checker_allows(snippet: str) -> None:
    assert problems(snippet) == []
