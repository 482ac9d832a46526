"""The pure part of authentication: key derivation, transcript and proofs against fixed vectors; token loading."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from fedlink.protocol.auth import (
    MAX_TOKEN_BYTES,
    MIN_TOKEN_BYTES,
    NONCE_BYTES,
    Keyring,
    Secret,
    check_proof,
    derive_key,
    make_proof,
    new_nonce,
    new_token,
    secret_from_env,
    secret_from_file,
    token_weakness,
    transcript,
)
from fedlink.protocol.errors import CredentialsError, MalformedFrame
from fedlink.protocol.frames import decode_frame, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import AuthChallenge, AuthProof, Hello

TOKEN = b"GZYyhAyxnQkAIvu6ofMLPBWAbRlP13M43fHTUf3-Ong"  # secrets.token_urlsafe(32), drawn once
COORDINATOR_HELLO = b"\x01\x81\xa1v\x01"  # stand-ins: the transcript hashes whatever bytes were sent
WORKER_HELLO = b"\x01\x81\xa1v\x02"
COORDINATOR_NONCE = bytes(range(32))
WORKER_NONCE = bytes(range(32, 64))

# Computed independently with hmac/hashlib from the formulas in fedlink.protocol.auth's docstring.
KEY = "3f36baeb8f3a09d4fc4e417df8941ce3ef1ee1be7ac1c63c9278c01c10bc73ce"
COORDINATOR_PROOF = "db6744b217d6bcca4163baf493a0f8dd2b005cd5741557043e69dc9e8d57db84"
WORKER_PROOF = "3639606e83bf1829a782f5dbcdb9b6cdbd355c2c45c21dfad5ba55a59be4006f"


def _transcript() -> bytes:
    return transcript(
        coordinator_hello=COORDINATOR_HELLO, worker_hello=WORKER_HELLO,
        coordinator_nonce=COORDINATOR_NONCE, worker_nonce=WORKER_NONCE,
    )


def test_key_derivation_fixed_vector() -> None:
    assert derive_key(TOKEN).hex() == KEY
    assert Secret.from_token(TOKEN, origin="test").key.hex() == KEY


def test_transcript_layout() -> None:
    text = _transcript()
    assert len(text) == len(b"fedlink-auth-v1") + 32 + 32 + NONCE_BYTES + NONCE_BYTES
    assert text.startswith(b"fedlink-auth-v1") and text.endswith(COORDINATOR_NONCE + WORKER_NONCE)


def test_proofs_fixed_vectors_and_directions() -> None:
    secret = Secret.from_token(TOKEN, origin="test")
    assert make_proof(secret, "coordinator", _transcript()).hex() == COORDINATOR_PROOF
    assert make_proof(secret, "worker", _transcript()).hex() == WORKER_PROOF


def test_check_proof_accepts_only_the_exact_proof() -> None:
    secret = Secret.from_token(TOKEN, origin="test")
    text = _transcript()
    good = bytes.fromhex(WORKER_PROOF)
    assert check_proof(secret, "worker", text, good)
    assert not check_proof(secret, "coordinator", text, good), "a worker's proof never passes as a coordinator's"
    assert not check_proof(Secret.from_token(TOKEN + b"!", origin="test"), "worker", text, good)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert not check_proof(secret, "worker", text, flipped)
    assert not check_proof(secret, "worker", text, good[:-1])
    other = transcript(
        coordinator_hello=COORDINATOR_HELLO, worker_hello=WORKER_HELLO + b"x",
        coordinator_nonce=COORDINATOR_NONCE, worker_nonce=WORKER_NONCE,
    )
    assert not check_proof(secret, "worker", other, good), "the proof covers the hellos"
    swapped = transcript(
        coordinator_hello=COORDINATOR_HELLO, worker_hello=WORKER_HELLO,
        coordinator_nonce=WORKER_NONCE, worker_nonce=COORDINATOR_NONCE,
    )
    assert not check_proof(secret, "worker", swapped, good), "the proof covers which nonce is whose"


@pytest.mark.parametrize("size", [0, 31, 33])
def test_transcript_refuses_nonces_of_the_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match="nonce"):
        transcript(coordinator_hello=b"", worker_hello=b"", coordinator_nonce=bytes(size), worker_nonce=bytes(32))


def test_nonces_and_tokens_are_fresh() -> None:
    assert len(new_nonce()) == NONCE_BYTES and new_nonce() != new_nonce()
    token = new_token()
    assert len(token.encode()) >= MIN_TOKEN_BYTES and token != new_token()


def test_secret_never_shows_its_key() -> None:
    secret = Secret.from_token(TOKEN, origin="token file /x")
    for text in (repr(secret), str(secret), f"{secret}"):
        assert KEY not in text and TOKEN.decode() not in text and "token file /x" in text


def test_short_token_is_refused_with_advice() -> None:
    with pytest.raises(CredentialsError, match=f"at least {MIN_TOKEN_BYTES}.*secrets.token_urlsafe"):
        Secret.from_token(b"  short \n", origin="$FEDLINK_TOKEN")


def test_token_file_and_variable_give_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    path.chmod(0o600)
    from_file = secret_from_file(path)
    from_env = secret_from_env({"FEDLINK_TOKEN": TOKEN.decode()})
    assert from_env is not None
    assert from_file.key == from_env.key == bytes.fromhex(KEY), "surrounding whitespace is not part of the token"
    assert str(path) in from_file.origin and from_env.origin == "$FEDLINK_TOKEN"


@pytest.mark.parametrize("value", [None, "", "   \n"])
def test_unset_or_empty_variable_means_no_token(value: str | None) -> None:
    environ = {} if value is None else {"FEDLINK_TOKEN": value}
    assert secret_from_env(environ) is None


def test_unusable_token_files_are_refused_naming_them(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_TOKEN_BYTES + 1))
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    for path in (big, empty):
        path.chmod(0o600)
    for path, words in [
        (tmp_path / "missing", "cannot read"),
        (tmp_path, "cannot read|not a regular file"),
        (big, "larger than"),
        (empty, "0 bytes long"),
    ]:
        with pytest.raises(CredentialsError, match=words) as refused:
            secret_from_file(path)
        assert str(path) in str(refused.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_token_file_open_to_others_is_refused_with_the_chmod_to_run(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN)
    path.chmod(mode)
    with pytest.raises(CredentialsError) as refused:
        secret_from_file(path)
    assert f"run `chmod 600 {path}`" in str(refused.value) and f"mode {mode:o}" in str(refused.value)
    assert TOKEN.decode() not in str(refused.value)
    path.chmod(0o600)
    assert secret_from_file(path).key == bytes.fromhex(KEY)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN)
    path.chmod(0)
    with pytest.raises(CredentialsError, match="cannot read"):
        secret_from_file(path)


def test_keyring_per_peer_secret_excludes_the_shared_one() -> None:
    shared = Secret.from_token(new_token().encode(), origin="shared")
    own = Secret.from_token(new_token().encode(), origin="own")
    ring = Keyring(shared=shared, per_peer={"w1": own})
    assert ring.for_peer("w1") is own and ring.for_peer("w2") is shared
    assert Keyring(per_peer={"w1": own}).for_peer("w2") is None
    assert ring and Keyring(per_peer={"w1": own}) and not Keyring()


# -- the auth messages on the wire: fixed bytes both ways -----------------------------------------------------------

CHALLENGE_BYTES = bytes.fromhex(
    "0184a17601a2696401a474797065ae617574685f6368616c6c656e6765a56e6f6e6365d940" + "6162" * 32
)
PROOF_BYTES = bytes.fromhex("0184a17601a2696402a474797065aa617574685f70726f6f66a36d6163d940" + "6364" * 32)


def test_auth_messages_fixed_bytes() -> None:
    challenge = AuthChallenge(id=1, nonce="ab" * 32)
    proof = AuthProof(id=2, mac="cd" * 32)
    assert encode_message(challenge) == CHALLENGE_BYTES
    assert encode_message(proof) == PROOF_BYTES
    assert decode_frame(CHALLENGE_BYTES, Limits()) == challenge
    assert decode_frame(PROOF_BYTES, Limits()) == proof


def test_hello_says_whether_auth_is_required_and_stays_the_same_without() -> None:
    plain = Hello(role="worker", peer_id="w")
    assert b"auth" not in encode_message(plain), "a hello without auth has the bytes it had before"
    required = Hello(role="worker", peer_id="w", auth="hmac-sha256")
    assert decode_frame(encode_message(required), Limits()) == required


@pytest.mark.parametrize(
    "body",
    [
        {"v": 1, "type": "auth_challenge", "nonce": "AB" * 32},
        {"v": 1, "type": "auth_challenge", "nonce": "ab" * 31},
        {"v": 1, "type": "auth_challenge", "nonce": "ab" * 32 + "\n"},
        {"v": 1, "type": "auth_challenge"},
        {"v": 1, "type": "auth_proof", "mac": "zz" * 32},
        {"v": 1, "type": "auth_proof", "mac": 12},
        {"v": 1, "type": "hello", "role": "worker", "peer_id": "w", "auth": "password"},
    ],
    ids=["upper-hex", "short", "newline", "missing", "not-hex", "not-a-string", "unknown-scheme"],
)
def test_malformed_auth_messages(body: dict[str, object]) -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(b"\x01" + msgpack.packb(body), Limits())


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (b"x" * 16, "16 bytes long"),
        (b"a" * 64, "repeat too much"),
        (b"abuse-test-token-" + b"z" * 24, "repeat too much"),
        (b"ab" * 32, "repeat too much"),
        (b"0123456789abcdef0123456789abcdef", "consecutive"),
        (b"abcdefghijklmnopqrstuvwxyz012345", "consecutive"),
        (b"Kq8-vL2mZr5xTn0wPj7c" * 2, "repeats a pattern"),
        (b"10110100101101001011010010110100", "alphabet of 10"),
    ],
)
def test_weak_tokens_are_refused_saying_why(token: bytes, words: str) -> None:
    assert token_weakness(token) is not None and words in (token_weakness(token) or "")
    with pytest.raises(CredentialsError, match=f"too weak: .*{words}.*secrets.token_urlsafe"):
        Secret.from_token(token, origin="$FEDLINK_TOKEN")


def test_generated_tokens_pass_the_rule() -> None:
    import secrets

    for _ in range(2000):  # random tokens fail rules 3-4 with a probability far below 1e-6 each
        for token in (new_token(), secrets.token_hex(16), secrets.token_hex(32), secrets.token_urlsafe(24)):
            assert token_weakness(token.encode()) is None, token
