"""Frames: encode/decode are exact inverses, fixed bytes both ways, and decode_frame is total."""

from __future__ import annotations

import math
import struct
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlink.faults import corrupt
from fedlink.protocol.errors import LimitExceeded, MalformedFrame, ProtocolError, VersionMismatch
from fedlink.protocol.frames import KIND_CONTROL, KIND_DATA, DataFrame, decode_frame, encode_data, encode_message
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import (
    PROTOCOL_VERSION,
    AnyMessage,
    AuthChallenge,
    AuthProof,
    Bye,
    DatasetInfo,
    Discard,
    ErrorMessage,
    EvaluateRequest,
    EvaluateResult,
    Heartbeat,
    Hello,
    HookSpec,
    Message,
    ModelSpec,
    OptimizerSpec,
    Pull,
    RoundEnd,
    StageRequest,
    StageResult,
    TrainingPlan,
    TrainRequest,
    TrainResult,
)
from fedlink.protocol.tensors import StateHeader, TensorSpec

LIMITS = Limits()
HEADER = StateHeader(
    tensors=(
        TensorSpec(name="fc.weight", dtype="float32", shape=(10, 64)),
        TensorSpec(name="bn.num_batches_tracked", dtype="int64", shape=()),
        TensorSpec(name="emb", dtype="bfloat16", shape=(0, 3)),
    )
)
MODEL = ModelSpec(factory="fedlink.models:mlp", kwargs={"in_features": 64, "hidden": [16, 8], "act": None, "p": 0.5})
PLAN = TrainingPlan(
    epochs=3,
    batch_size=17,
    optimizer=OptimizerSpec(name="adamw", lr=1e-3, momentum=0.9, weight_decay=0.01, nesterov=True),
    update="delta",
    seed=2**63 - 1,
    max_steps=100,
    hooks=(HookSpec(name="grad_clip", params={"max_norm": 1.5}), HookSpec(name="proximal", params={"mu": 0.01})),
)

SAMPLES: list[Message] = [
    Hello(role="worker", peer_id="w1"),
    Hello(
        id=1,
        role="coordinator",
        peer_id="c" * 128,
        software="fedlink 0.1.0",
        capabilities=("train", "evaluate"),
        dataset=DatasetInfo(num_samples=1000, sample_shape=(1, 28, 28), x_dtype="float32"),
    ),
    Hello(role="worker", peer_id="w2", auth="hmac-sha256"),
    AuthChallenge(id=1, nonce="0123456789abcdef" * 4),
    AuthProof(id=2, mac="f" * 64),
    TrainRequest(round=0, task_id="t", model=ModelSpec(factory="m:f"), plan=TrainingPlan()),
    TrainRequest(id=7, round=5, task_id="r5-w1", model=MODEL, plan=PLAN, state=HEADER),
    TrainResult(round=0, task_id="t", update="weights", num_samples=0),
    TrainResult(
        id=2**63 - 1,
        reply_to=7,
        round=5,
        task_id="r5-w1",
        update="gradients",
        num_samples=1234,
        metrics={"loss": 0.25, "nan": math.nan, "inf": -math.inf, "accuracy": 1.0},
        train_seconds=1.5,
        state=HEADER,
    ),
    EvaluateRequest(round=1, task_id="e", model=MODEL),
    EvaluateRequest(id=3, round=1, task_id="e", model=MODEL, batch_size=1 << 20, state=HEADER),
    EvaluateResult(round=1, task_id="e", num_samples=10, loss=0.5, accuracy=0.9),
    EvaluateResult(id=4, reply_to=3, round=1, task_id="e", num_samples=0, loss=math.nan, accuracy=math.inf),
    StageRequest(round=2, task_id="r2-keys-w1", stage="keys", handler="my_lab.stages:Keys", run="abc"),
    StageRequest(id=11, round=2, task_id="t", stage="s", handler="h", payload={"k": [1, 2.5, "x", None]}, state=HEADER),
    StageResult(round=2, task_id="t", payload={"answer": {"nested": True}}),
    StageResult(id=12, reply_to=11, round=2, task_id="t", state=HEADER),
    RoundEnd(round=3, run="abc"),
    Heartbeat(),
    Heartbeat(id=99),
    ErrorMessage(code="busy"),
    ErrorMessage(id=5, reply_to=4, code="transfer_failed", message="é" * 4096, ref=4),
    Pull(ref=0),
    Pull(id=6, ref=2**63 - 1),
    Discard(ref=3),
    Discard(id=8, ref=3),
    Bye(),
    Bye(id=9, reason="shutting down ☃"),
]


def _ids(message: Message) -> str:
    return f"{message.type}-{message.id}"


def _same(a: Message, b: Message) -> bool:
    """Equality that treats NaN as equal to NaN (a NaN metric must survive the round trip)."""
    return msgpack.packb(a.model_dump(mode="python")) == msgpack.packb(b.model_dump(mode="python"))


def test_samples_cover_every_message_type() -> None:
    union = typing.get_args(typing.get_args(AnyMessage)[0])
    assert {type(m) for m in SAMPLES} == set(union)


@pytest.mark.parametrize("message", SAMPLES, ids=_ids)
def test_message_round_trip(message: Message) -> None:
    data = encode_message(message)
    assert data[0] == KIND_CONTROL
    decoded = decode_frame(data, LIMITS)
    assert type(decoded) is type(message)
    assert _same(decoded, message)
    assert encode_message(decoded) == data, "encode(decode(bytes)) gives the same bytes"


@pytest.mark.parametrize("message", SAMPLES, ids=_ids)
def test_message_decodes_from_any_buffer(message: Message) -> None:
    data = encode_message(message)
    for buffer in (bytearray(data), memoryview(data)):
        assert _same(decode_frame(buffer, LIMITS), message)


def test_nan_metrics_survive() -> None:
    sent = TrainResult(round=0, task_id="t", update="weights", num_samples=1, metrics={"loss": math.nan})
    got = decode_frame(encode_message(sent), LIMITS)
    assert isinstance(got, TrainResult) and math.isnan(got.metrics["loss"])


def test_none_inside_model_kwargs_survives() -> None:
    sent = TrainRequest(round=0, task_id="t", model=ModelSpec(factory="m:f", kwargs={"a": None}), plan=PLAN)
    got = decode_frame(encode_message(sent), LIMITS)
    assert isinstance(got, TrainRequest) and got.model.kwargs == {"a": None}


# -- fixed bytes --------------------------------------------------------------------------------------------------

HEARTBEAT_1 = (
    b"\x01"  # kind: control
    + b"\x83"  # fixmap, 3 entries (reply_to and state are None and left out)
    + b"\xa1v" + b"\x01"  # "v": 1
    + b"\xa2id" + b"\x01"  # "id": 1
    + b"\xa4type" + b"\xa9heartbeat"  # "type": "heartbeat"
)

PULL_7_REF_300 = (
    b"\x01"
    + b"\x84"
    + b"\xa1v" + b"\x01"
    + b"\xa2id" + b"\x07"
    + b"\xa4type" + b"\xa4pull"
    + b"\xa3ref" + b"\xcd\x01\x2c"  # uint16 300
)


def test_heartbeat_fixed_bytes() -> None:
    assert encode_message(Heartbeat(id=1)) == HEARTBEAT_1
    assert decode_frame(HEARTBEAT_1, LIMITS) == Heartbeat(id=1)


def test_pull_fixed_bytes() -> None:
    assert encode_message(Pull(id=7, ref=300)) == PULL_7_REF_300
    assert decode_frame(PULL_7_REF_300, LIMITS) == Pull(id=7, ref=300)


def test_data_frame_fixed_bytes() -> None:
    expected = b"\x02" + (5).to_bytes(8, "big") + (2).to_bytes(4, "big") + b"abc"
    assert expected == b"\x02\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x02abc"
    assert encode_data(5, 2, b"abc") == expected
    assert encode_data(5, 2, memoryview(b"abc")) == expected
    assert encode_data(5, 2, [b"a", memoryview(b"bc")]) == expected, "pieces are joined behind the header"
    assert encode_data(5, 2, bytearray(b"abc")) == expected
    frame = decode_frame(expected, LIMITS)
    assert isinstance(frame, DataFrame)
    assert (frame.ref, frame.seq, bytes(frame.payload)) == (5, 2, b"abc")


def test_data_frame_extremes() -> None:
    payload = bytes(range(256))
    data = encode_data(2**64 - 1, 2**32 - 1, payload)
    frame = decode_frame(data, LIMITS)
    assert isinstance(frame, DataFrame)
    assert (frame.ref, frame.seq, bytes(frame.payload)) == (2**64 - 1, 2**32 - 1, payload)


def test_data_frame_payload_is_a_view() -> None:
    data = encode_data(1, 0, b"x" * 1000)
    frame = decode_frame(data, LIMITS)
    assert isinstance(frame, DataFrame) and isinstance(frame.payload, memoryview)
    assert frame.payload.obj is data, "no copy of the payload"


def test_largest_frame_is_accepted() -> None:
    limits = Limits(max_frame_bytes=64 * 1024)
    data = encode_data(1, 0, b"\x00" * (64 * 1024 - 13))
    assert len(data) == limits.max_frame_bytes
    assert isinstance(decode_frame(data, limits), DataFrame)


# -- refusals -----------------------------------------------------------------------------------------------------


def _control(body: object) -> bytes:
    return b"\x01" + msgpack.packb(body, use_bin_type=True)


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatch) as refused:
        decode_frame(_control({"v": 2, "id": 1, "type": "heartbeat"}), LIMITS)
    text = str(refused.value)
    assert "version 2" in text and f"speaks {PROTOCOL_VERSION}" in text


@pytest.mark.parametrize("version", [0, 2, 255, -1, 2**40])
def test_other_versions_are_mismatches(version: int) -> None:
    with pytest.raises(VersionMismatch, match=str(version)):
        decode_frame(_control({"v": version, "type": "hello", "role": "worker", "peer_id": "x"}), LIMITS)


@pytest.mark.parametrize("version", [None, "1", 1.0, True, [1]], ids=repr)
def test_missing_or_odd_version_is_malformed(version: object) -> None:
    """A map without an integer ``v`` is not a fedlink message; "upgrade the older side" would mislead."""
    body: dict[str, object] = {"id": 1, "type": "heartbeat"}
    if version is not None:
        body["v"] = version
    with pytest.raises(MalformedFrame, match="without a protocol version"):
        decode_frame(_control(body), LIMITS)


def test_version_is_checked_before_the_fields() -> None:
    """A newer peer's message may have fields we do not know: the version is what we report."""
    with pytest.raises(VersionMismatch):
        decode_frame(_control({"v": 2, "type": "hello2", "anything": [1, 2]}), LIMITS)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"\x00", "unknown frame kind 0x00", id="kind-0"),
        pytest.param(b"\x03abc", "unknown frame kind 0x03", id="kind-3"),
        pytest.param(b"\xff" + encode_message(Heartbeat())[1:], "unknown frame kind 0xff", id="kind-ff"),
        pytest.param(b"\x02", "without payload", id="data-kind-only"),
        pytest.param(b"\x02\x00\x00\x00", "without payload", id="data-short-header"),
        pytest.param(struct.pack(">BQI", KIND_DATA, 1, 0), "without payload", id="data-no-payload"),
        pytest.param(b"\x01", "msgpack", id="control-no-body"),
        pytest.param(b"\x01\xc1", "msgpack", id="control-bad-byte"),
        pytest.param(HEARTBEAT_1[:-3], "msgpack", id="control-truncated"),
        pytest.param(HEARTBEAT_1 + b"\x00", "msgpack", id="control-trailing"),
        pytest.param(b"\x01" + b"\x91" * 5000 + b"\xc0", "msgpack", id="control-deep"),
        pytest.param(_control([1, 2]), "holds a list", id="control-array"),
        pytest.param(_control("heartbeat"), "holds a str", id="control-str"),
        pytest.param(_control(None), "holds a NoneType", id="control-nil"),
        pytest.param(_control({1: 1}), "msgpack", id="control-int-key"),
        pytest.param(_control({"v": 1, "id": 1, "type": "heartbeat", "x": b"bin"}), "msgpack", id="control-bin"),
        pytest.param(b"\x01\xd4\x01\x00", "msgpack", id="control-ext"),
        pytest.param(_control({"v": 1, "type": "nope"}), "'nope'", id="unknown-type"),
        pytest.param(_control({"v": 1, "id": 1}), "None", id="no-type"),
        pytest.param(_control({}), "version", id="empty-map"),
        pytest.param(_control({"v": 1, "type": 5}), "5", id="type-int"),
        pytest.param(_control({"v": 1, "type": "pull", "id": 1}), "ref", id="missing-field"),
        pytest.param(_control({"v": 1, "type": "hello", "role": "worker"}), "peer_id", id="hello-no-peer-id"),
        pytest.param(_control({"v": 1, "type": "heartbeat", "x": 1}), "x", id="extra-field"),
        pytest.param(
            _control({"v": 1, "type": "hello", "role": "worker", "peer_id": "w", "dataset": {"num_samples": 1,
                      "sample_shape": [], "x_dtype": "f", "extra": 1}}),
            "extra",
            id="nested-extra-field",
        ),
        pytest.param(_control({"v": 1, "type": "hello", "role": "server", "peer_id": "x"}), "role", id="bad-literal"),
        pytest.param(_control({"v": 1, "type": "pull", "ref": -1}), "ref", id="negative-ref"),
        pytest.param(_control({"v": 1, "type": "pull", "ref": 2**63}), "ref", id="ref-too-big"),
        pytest.param(_control({"v": 1, "type": "heartbeat", "id": "x"}), "id", id="id-str"),
        pytest.param(
            _control({"v": 1, "type": "heartbeat", "state": {"tensors": [{"name": "a", "dtype": "x", "shape": []}]}}),
            "state",
            id="bad-state-header",
        ),
        pytest.param(
            _control({"v": 1, "type": "heartbeat", "state": {"tensors": [{"name": "a", "dtype": "int8", "shape": [-1]}]}}),
            "state",
            id="negative-shape",
        ),
        pytest.param(_control({"v": 1, "type": "error", "code": ""}), "code", id="empty-error-code"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedFrame, match=match):
        decode_frame(data, LIMITS)


@pytest.mark.parametrize("data", ["hello", "\x01\x83", 42, None, [1], {"v": 1}], ids=repr)
def test_text_and_other_objects_are_malformed(data: object) -> None:
    with pytest.raises(MalformedFrame, match="expected a binary frame"):
        decode_frame(data, LIMITS)


def test_oversize_frame() -> None:
    limits = Limits(max_frame_bytes=64 * 1024)
    for data in (encode_data(1, 0, b"\x00" * (64 * 1024 - 12)), b"\x01" + b"\x00" * (64 * 1024)):
        with pytest.raises(LimitExceeded, match=f"frame of {64 * 1024 + 1} bytes, limit is {64 * 1024}"):
            decode_frame(data, limits)


def test_oversize_control_message() -> None:
    """A control message is small even when frames may be large (data frames carry the big things)."""
    limits = Limits(max_frame_bytes=8 << 20)
    data = _control({"v": 1, "type": "bye", "reason": "x" * (1 << 20)})
    with pytest.raises(LimitExceeded, match="control message"):
        decode_frame(data, limits)


def test_protocol_error_codes() -> None:
    for cls, code in [(MalformedFrame, "malformed"), (VersionMismatch, "version_mismatch"), (LimitExceeded, "limit_exceeded")]:
        assert cls("x").code == code


# -- fuzzing: decode_frame is total ---------------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_frame_bytes=64 * 1024)
_FRAMES = [encode_message(m) for m in SAMPLES] + [encode_data(5, 2, b"abc"), encode_data(0, 0, b"\x00" * 64)]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["hello", "train", "pull", "error", "worker", "float32", "weights", "sgd"])
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_field_names = st.sampled_from(
    ["id", "reply_to", "state", "role", "peer_id", "round", "task_id", "model", "plan", "code", "ref", "reason",
     "update", "num_samples", "metrics", "loss", "accuracy", "dataset", "capabilities", "tensors"]
)
_messages = st.fixed_dictionaries(
    {"v": st.just(PROTOCOL_VERSION) | _values, "type": st.sampled_from(
        ["hello", "train", "train_result", "evaluate", "evaluate_result", "heartbeat", "error", "pull", "discard", "bye"]
    ) | _values},
).flatmap(lambda base: st.dictionaries(_field_names | st.text(max_size=6), _values, max_size=6).map(lambda d: {**d, **base}))


def _total(data: object) -> None:
    try:
        frame = decode_frame(data, FUZZ_LIMITS)
    except ProtocolError as exc:
        assert isinstance(exc, (MalformedFrame, VersionMismatch, LimitExceeded))
        return
    assert isinstance(frame, (Message, DataFrame))
    if isinstance(frame, Message):  # what decodes must encode again
        assert isinstance(encode_message(frame), bytes)


def _fuzz_bytes(data: bytes) -> None:
    _total(data)
    _total(b"\x01" + data)


def _fuzz_mutations(frame: bytes, edits: list[tuple[int, int, str]], cut: int | None) -> None:
    _total(corrupt(frame, edits, cut=cut))


def _fuzz_structure(body: dict[str, object]) -> None:
    _total(_control(body))


_BYTES = given(data=st.binary(max_size=300))
_MUTATIONS = given(
    frame=st.sampled_from(_FRAMES),
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
        min_size=1,
        max_size=4,
    ),
    cut=st.none() | st.integers(0, 1 << 16),
)
_STRUCTURE = given(body=_messages)

CI = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(CI, max_examples=100_000)

test_decode_frame_fuzz_bytes = CI(_BYTES(_fuzz_bytes))
test_decode_frame_fuzz_mutations = CI(_MUTATIONS(_fuzz_mutations))
test_decode_frame_fuzz_structure = settings(CI, max_examples=150)(_STRUCTURE(_fuzz_structure))

test_decode_frame_fuzz_bytes_long = pytest.mark.slow(LONG(_BYTES(_fuzz_bytes)))
test_decode_frame_fuzz_mutations_long = pytest.mark.slow(LONG(_MUTATIONS(_fuzz_mutations)))
test_decode_frame_fuzz_structure_long = pytest.mark.slow(settings(LONG, max_examples=20_000)(_STRUCTURE(_fuzz_structure)))
