"""fedlink.display: peer-supplied text made safe to log and show; peer ids checked and derived. Pure."""

from __future__ import annotations

import pytest

from fedlink.display import MAX_SHOWN, is_peer_id, safe, to_peer_id


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain words [bold] ok", "plain words [bold] ok"),
        ("line\nFORGED", "line\\x0aFORGED"),
        ("cr\rover", "cr\\x0dover"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x9b31m", "\\x9b31m"),  # C1 control sequence introducer
        ("a\u202eb", "a\\u202eb"),  # right-to-left override
        ("a\u2028b", "a\\u2028b"),  # line separator
        ("back\\x0aslash", "back\\\\x0aslash"),  # a peer's own escape cannot pass for ours
        ("héllo wörld ☃", "héllo wörld ☃"),
    ],
)
def test_safe_escapes_controls_and_keeps_the_rest(text: str, shown: str) -> None:
    assert safe(text) == shown
    assert "\n" not in safe(text) and "\x1b" not in safe(text)


def test_safe_cuts_long_text_and_takes_anything() -> None:
    assert safe("x" * (MAX_SHOWN + 10)) == "x" * MAX_SHOWN + "..."
    assert safe("abcdef", limit=3) == "abc..."
    assert safe(ValueError("bad\nthing")) == "bad\\x0athing"


@pytest.mark.parametrize("good", ["w1", "site-a", "worker-0", "a.b_c@d:e+f", "X" * 128, "9lives"])
def test_valid_peer_ids(good: str) -> None:
    assert is_peer_id(good)


@pytest.mark.parametrize("bad", ["", "-x", ".x", "lab[/x]", "a b", "x\n", "x" * 129, "é", "a/b", "a'b", "a\x1b"])
def test_invalid_peer_ids(bad: str) -> None:
    assert not is_peer_id(bad)


@pytest.mark.parametrize(
    ("name", "derived"),
    [
        ("shard-0", "shard-0"),
        ("lab [x] site\x1b", "lab-x-site"),
        ("--hidden", "hidden"),
        ("données", "donn-es"),
        ("[]", "worker"),
        ("a" * 300, "a" * 128),
    ],
)
def test_to_peer_id(name: str, derived: str) -> None:
    assert to_peer_id(name) == derived and is_peer_id(to_peer_id(name))
