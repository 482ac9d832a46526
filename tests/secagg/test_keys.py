from __future__ import annotations

from typing import Any

import pytest

from fedlink.secagg import keys
from fedlink.secagg.errors import ProtocolViolation, ShareDecryptionFailed

SESSION = bytes(range(32))


def _keys() -> dict[str, tuple[bytes, bytes]]:
    return {"b": (b"\x02" * 32, b"\x03" * 32), "a": (b"\x00" * 32, b"\x01" * 32)}


def test_session_id_binds_round_params_ids_and_every_key() -> None:
    base = keys.session_id(round=1, params=b"p", keys=_keys())
    assert base == keys.session_id(round=1, params=b"p", keys=dict(reversed(list(_keys().items()))))
    assert base != keys.session_id(round=2, params=b"p", keys=_keys())
    assert base != keys.session_id(round=1, params=b"q", keys=_keys())
    changed = _keys() | {"a": (b"\x00" * 32, b"\x09" * 32)}
    assert base != keys.session_id(round=1, params=b"p", keys=changed)
    renamed = {"c" if k == "b" else k: v for k, v in _keys().items()}
    assert base != keys.session_id(round=1, params=b"p", keys=renamed)


def test_both_ends_derive_the_same_pairwise_seed_and_purposes_differ() -> None:
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    ab = keys.pairwise_seed(a.agree(b.public), session=SESSION, a="a", b="b")
    assert ab == keys.pairwise_seed(b.agree(a.public), session=SESSION, a="b", b="a")
    assert ab != keys.pairwise_seed(a.agree(b.public), session=bytes(32), a="a", b="b")
    to_b = keys.share_key(a.agree(b.public), session=SESSION, sender="a", recipient="b")
    to_a = keys.share_key(a.agree(b.public), session=SESSION, sender="b", recipient="a")
    assert len({ab, to_b, to_a}) == 3
    assert keys.public_from_private(a.private) == a.public


def _decrypt(ciphertext: bytes, *, session: bytes = SESSION, round: int = 4, sender: str = "a", recipient: str = "b") -> bytes:
    plain: bytes = keys.decrypt_share(
        bytes(range(32)), ciphertext, session=session, round=round, sender=sender, recipient=recipient
    )
    return plain


def test_share_encryption_round_trip_and_binding() -> None:
    key = bytes(range(32))
    ciphertext = keys.encrypt_share(key, b"share", session=SESSION, round=4, sender="a", recipient="b")
    assert _decrypt(ciphertext) == b"share"
    assert keys.encrypt_share(key, b"share", session=SESSION, round=4, sender="a", recipient="b") != ciphertext
    wrong: list[dict[str, Any]] = [{"recipient": "c"}, {"sender": "b", "recipient": "a"}, {"round": 5}, {"session": bytes(32)}]
    for change in wrong:
        with pytest.raises(ShareDecryptionFailed, match="does not authenticate"):
            _decrypt(ciphertext, **change)
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(ShareDecryptionFailed, match="peer 'a'"):
        _decrypt(tampered)
    with pytest.raises(ShareDecryptionFailed, match="too short"):
        _decrypt(b"x")


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="unusable X25519 public key.*peer 'mallory'"):
        keys.KeyPair.generate().agree(bytes(32), peer="mallory")
