from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from fedlink.errors import ModelError, ModelNotAllowed
from fedlink.factory import DEFAULT_PATTERNS, ModelAllowList, build_model, parse_factory

_MODULE_SOURCE = '''
from pathlib import Path
from torch import nn

Path({marker!r}).write_text("imported")

def tiny(width: int = 3) -> nn.Module:
    return nn.Linear(width, 2)

def not_a_model() -> str:
    return "hello"

def explodes() -> nn.Module:
    raise RuntimeError("boom")

CONSTANT = 42
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A real module on sys.path whose import leaves a marker file, so the tests can see if it ran."""
    name = f"fedlink_test_usermod_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(_MODULE_SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("fedlink.models:mlp", ("fedlink.models", "mlp")),
        ("a:b", ("a", "b")),
        ("_private.pkg_2:Make_3", ("_private.pkg_2", "Make_3")),
    ],
)
def test_parse_factory(path: str, expected: tuple[str, str]) -> None:
    assert parse_factory(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "fedlink.models.mlp",
        "fedlink.models:",
        ":mlp",
        "fedlink..models:mlp",
        "fedlink.models:mlp:x",
        "fedlink.models:mlp.x",
        "fedlink.models:__class__",
        "fedlink.models:mlp\n",
        " fedlink.models:mlp",
        "os;rm:x",
        "1mod:x",
        "fedlink.modеls:mlp",  # Cyrillic "е"
        "",
    ],
)
def test_parse_factory_rejects_other_forms(path: str) -> None:
    with pytest.raises(ModelError) as info:
        parse_factory(path)
    assert repr(path) in str(info.value)
    assert "module:callable" in str(info.value)


def test_parse_factory_rejects_non_strings() -> None:
    with pytest.raises(ModelError):
        parse_factory(123)  # type: ignore[arg-type]


def test_default_allow_list_admits_only_builtin_models() -> None:
    allow = ModelAllowList()
    assert allow.patterns == DEFAULT_PATTERNS
    assert allow.allows("fedlink.models:mnist_cnn")
    assert not allow.allows("fedlink.modelsx:mlp")
    assert not allow.allows("fedlink.factory:build_model")
    assert not allow.allows("os:system")
    assert not allow.allows("FEDLINK.models:mlp")  # case-sensitive on every platform
    assert not allow.allows("not a path")


def test_builtin_model_builds_with_default_allow_list() -> None:
    model = build_model("fedlink.models:mlp", {"in_features": 4, "num_classes": 3}, ModelAllowList())
    assert isinstance(model, nn.Sequential)
    assert model[-1].out_features == 3


def test_disallowed_factory_is_refused_before_import(user_module: tuple[str, Path]) -> None:
    name, marker = user_module
    with pytest.raises(ModelNotAllowed) as info:
        build_model(f"{name}:tiny", {}, ModelAllowList())
    message = str(info.value)
    assert f"{name}:tiny" in message
    assert "fedlink.models:*" in message
    assert "fl-worker --allow-model" in message
    assert name not in sys.modules
    assert not marker.exists()


def test_check_raises_for_disallowed_and_malformed() -> None:
    allow = ModelAllowList(["mylab.*:*"])
    allow.check("mylab.nets:resnet")
    with pytest.raises(ModelNotAllowed):
        allow.check("otherlab.nets:resnet")
    with pytest.raises(ModelError) as info:
        allow.check("mylab.nets")
    assert not isinstance(info.value, ModelNotAllowed)


def test_allowed_custom_pattern_builds(user_module: tuple[str, Path]) -> None:
    name, marker = user_module
    allow = ModelAllowList([*DEFAULT_PATTERNS, "fedlink_test_usermod_*:tiny"])
    model = build_model(f"{name}:tiny", {"width": 5}, allow)
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert marker.read_text() == "imported"
    with pytest.raises(ModelNotAllowed):  # the pattern names one callable, not the whole module
        build_model(f"{name}:explodes", {}, allow)


def test_allow_list_accepts_a_single_string() -> None:
    assert ModelAllowList("a.b:*").patterns == ("a.b:*",)


@pytest.mark.parametrize("pattern", ["", "   ", 3])
def test_allow_list_rejects_empty_patterns(pattern: object) -> None:
    with pytest.raises(ModelError):
        ModelAllowList([pattern])  # type: ignore[list-item]


def test_bad_kwargs_give_model_error() -> None:
    with pytest.raises(ModelError) as info:
        build_model("fedlink.models:mlp", {"no_such_argument": 1}, ModelAllowList())
    assert isinstance(info.value.__cause__, TypeError)
    assert "fedlink.models:mlp" in str(info.value)
    assert "no_such_argument" in str(info.value)


def test_bad_kwarg_values_give_model_error() -> None:
    with pytest.raises(ModelError) as info:
        build_model("fedlink.models:mlp", {"hidden": -3}, ModelAllowList())
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("callable_name", "cause", "words"),
    [
        ("missing", AttributeError, "no attribute"),
        ("CONSTANT", None, "not a callable"),
        ("not_a_model", None, "not a torch.nn.Module"),
        ("explodes", RuntimeError, "boom"),
    ],
)
def test_factory_failures_are_model_errors(
    user_module: tuple[str, Path], callable_name: str, cause: type[BaseException] | None, words: str
) -> None:
    name, _ = user_module
    with pytest.raises(ModelError) as info:
        build_model(f"{name}:{callable_name}", {}, ModelAllowList([f"{name}:*"]))
    assert words in str(info.value)
    assert f"{name}:{callable_name}" in str(info.value)
    if cause is not None:
        assert isinstance(info.value.__cause__, cause)


def test_missing_module_is_model_error() -> None:
    with pytest.raises(ModelError) as info:
        build_model("fedlink_no_such_module_xyz:make", {}, ModelAllowList(["fedlink_no_such_module_xyz:*"]))
    assert isinstance(info.value.__cause__, ImportError)


def test_module_that_fails_on_import_is_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fedlink_test_broken_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("raise SystemError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModelError) as info:
            build_model(f"{name}:make", {}, ModelAllowList([f"{name}:*"]))
    finally:
        sys.modules.pop(name, None)
    assert "half installed" in str(info.value)


def test_kwargs_must_be_a_mapping_of_names() -> None:
    with pytest.raises(ModelError):
        build_model("fedlink.models:mlp", [("hidden", 3)], ModelAllowList())  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        build_model("fedlink.models:mlp", {1: 3}, ModelAllowList())  # type: ignore[dict-item]


def test_error_message_bounds_huge_kwargs() -> None:
    with pytest.raises(ModelError) as info:
        build_model("fedlink.models:mlp", {"junk": "x" * 100_000}, ModelAllowList())
    assert len(str(info.value)) < 1000
