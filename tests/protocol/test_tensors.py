"""The tensor codec: bit-exact round trips, fixed bytes, header checks, and refusal of bad documents."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlink.faults import corrupt
from fedlink.protocol.errors import LimitExceeded, MalformedFrame, StateMismatch, TransferError
from fedlink.protocol.limits import Limits
from fedlink.protocol.tensors import (
    DTYPES,
    State,
    StateAssembler,
    StateHeader,
    TensorSpec,
    check_header,
    decode_state,
    encode_state,
    header_of,
    iter_state_chunks,
)

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8 (works for 0-dim, empty, bool and non-contiguous tensors)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bit_exact(got: State, want: State) -> None:
    assert list(got) == list(want), "names and order survive"
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert torch.equal(_bits(g), _bits(w)), f"bytes of {name} differ"


def _from_bits(values: list[int], int_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=int_dtype).view(dtype)


def special_state() -> State:
    """Every dtype a model state typically holds, with the values most likely to be mangled on the way."""
    g = torch.Generator().manual_seed(1234)
    f32 = torch.cat(
        [
            _from_bits(
                [
                    0x7FC00000,  # quiet NaN
                    0x7FC12345,  # quiet NaN with a payload
                    0x7F800001,  # signalling NaN
                    -0x003EDCBB,  # 0xFFC12345: negative NaN with a payload
                    0x7F800000,  # +inf
                    -0x00800000,  # 0xFF800000: -inf
                    -0x80000000,  # -0.0
                    0x00000001,  # smallest subnormal
                ],
                torch.int32,
                torch.float32,
            ),
            torch.randn(1492, generator=g),
        ]
    )
    f16 = _from_bits([0x7E01, 0x7C01, -0x8000, 0x7C00, -0x0400, 0x0001, 0x3C00], torch.int16, torch.float16)
    bf16 = _from_bits([0x7FC1, 0x7F81, -0x8000, 0x7F80, -0x0080, 0x0001, 0x3F80], torch.int16, torch.bfloat16)
    f64 = _from_bits(
        [0x7FF8000000000001, 0x7FF0000000000001, -0x8000000000000000, 0x7FF0000000000000, 1], torch.int64, torch.float64
    )
    bn = torch.nn.BatchNorm1d(3)
    bn.train()
    bn(torch.randn(4, 3, generator=g))
    base = torch.randn(6, 5, generator=g)
    state: State = {
        "f32": f32.reshape(50, 30),
        "f16": f16,
        "bf16": bf16,
        "f64": f64,
        **{f"bn.{k}": v for k, v in bn.state_dict().items()},  # num_batches_tracked: int64, 0-dim
        "scalar_f32": torch.tensor(-0.0),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0, -1], dtype=torch.int64),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "i32": torch.arange(-7, 8, dtype=torch.int32) * 123_456_789,
        "u8": torch.arange(256, dtype=torch.uint8),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "c64": torch.complex(torch.tensor([1.5, float("nan")]), torch.tensor([-0.0, float("inf")])),
        "empty_f32": torch.empty(0),
        "empty_2d": torch.zeros(3, 0, dtype=torch.int64),
        "transposed": base.t(),  # non-contiguous view
        "strided_i32": torch.arange(20, dtype=torch.int32)[::3],  # non-contiguous, storage offset 0
        "offset_view": base[2:, 1:4],  # non-contiguous with a storage offset
        "expanded": torch.tensor([[1.0], [2.0]]).expand(2, 4),  # stride 0
        "needs_grad": torch.nn.Parameter(torch.randn(3, generator=g)),
    }
    assert state["bn.num_batches_tracked"].dtype == torch.int64 and state["bn.num_batches_tracked"].dim() == 0
    assert not state["transposed"].is_contiguous() and not state["offset_view"].is_contiguous()
    return state


def assemble(state: State, chunk_bytes: int) -> State:
    header = header_of(state)
    assembler = StateAssembler(header)
    chunks = [bytes(c) for c in iter_state_chunks(state, header, chunk_bytes)]
    assert sum(map(len, chunks)) == header.nbytes
    assert all(len(c) == chunk_bytes for c in chunks[:-1]), "every chunk but the last is full"
    assert all(0 < len(c) <= chunk_bytes for c in chunks)
    for chunk in chunks:
        assert not assembler.done
        assembler.feed(chunk)
    assert assembler.done and assembler.received == header.nbytes
    return assembler.result()


# -- round trips --------------------------------------------------------------------------------------------------


def test_encode_decode_is_bit_exact() -> None:
    state = special_state()
    assert_bit_exact(decode_state(encode_state(state)), state)


def test_every_supported_dtype_round_trips() -> None:
    state = {name: torch.ones(3, dtype=dtype) for name, dtype in DTYPES.items()}
    assert_bit_exact(decode_state(encode_state(state)), state)
    assert_bit_exact(assemble(state, 5), state)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
def test_chunks_and_assembler_are_bit_exact(chunk_bytes: int) -> None:
    state = special_state()
    assert chunk_bytes == 1 << 20 or header_of(state).nbytes > chunk_bytes
    assert_bit_exact(assemble(state, chunk_bytes), state)


def test_chunk_exactly_one_tensor() -> None:
    state = {"a": torch.arange(4, dtype=torch.int32), "b": torch.arange(4, dtype=torch.int32)}
    chunks = [bytes(c) for c in iter_state_chunks(state, header_of(state), 16)]
    assert chunks == [_bits(state["a"]).numpy().tobytes(), _bits(state["b"]).numpy().tobytes()]
    assert_bit_exact(assemble(state, 16), state)


def test_decoded_tensors_are_usable_and_independent() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    decoded = decode_state(encode_state(state))
    decoded["w"].add_(1)  # a caller owns what it decodes
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assembled = assemble(state, 7)
    assembled["w"].mul_(2)
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_empty_state() -> None:
    assert decode_state(encode_state({})) == {}
    assembler = StateAssembler(StateHeader(tensors=()))
    assert assembler.done and assembler.result() == {}
    assert list(iter_state_chunks({}, StateHeader(tensors=()), 4096)) == []


def test_state_of_only_empty_tensors_needs_no_bytes() -> None:
    state = {"a": torch.empty(0, 4), "b": torch.empty(0, dtype=torch.bool)}
    assert list(iter_state_chunks(state, header_of(state), 4096)) == []
    assembler = StateAssembler(header_of(state))
    assert assembler.done
    assert_bit_exact(assembler.result(), state)


# -- fixed bytes --------------------------------------------------------------------------------------------------


# {"v": 1, "tensors": [{"name": "x", "dtype": "float32", "shape": [2], "data": <8 bytes>},
#                      {"name": "n", "dtype": "int64", "shape": [], "data": <8 bytes>}]}
TINY_DOC = (
    b"\x82"  # fixmap, 2 entries
    + b"\xa1v" + b"\x01"  # "v": 1
    + b"\xa7tensors" + b"\x92"  # "tensors": fixarray of 2
    + b"\x84"  # fixmap, 4 entries
    + b"\xa4name" + b"\xa1x"
    + b"\xa5dtype" + b"\xa7float32"
    + b"\xa5shape" + b"\x91\x02"  # [2]
    + b"\xa4data" + b"\xc4\x08" + b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0"  # bin 8: 1.0f, -2.0f little-endian
    + b"\x84"
    + b"\xa4name" + b"\xa1n"
    + b"\xa5dtype" + b"\xa5int64"
    + b"\xa5shape" + b"\x90"  # [] (0-dim)
    + b"\xa4data" + b"\xc4\x08" + b"\x07" + b"\x00" * 7  # bin 8: 7 little-endian
)


def test_encode_state_fixed_bytes() -> None:
    state = {"x": torch.tensor([1.0, -2.0]), "n": torch.tensor(7)}
    assert encode_state(state) == TINY_DOC


def test_decode_state_fixed_bytes() -> None:
    state = decode_state(TINY_DOC)
    assert_bit_exact(state, {"x": torch.tensor([1.0, -2.0]), "n": torch.tensor(7)})


def test_header_of() -> None:
    header = header_of({"w": torch.zeros(2, 3), "n": torch.tensor(1)})
    assert header.tensors == (
        TensorSpec(name="w", dtype="float32", shape=(2, 3)),
        TensorSpec(name="n", dtype="int64", shape=()),
    )
    assert header.nbytes == 6 * 4 + 8
    assert header.tensors[0].describe() == "w float32[2, 3]"


def test_header_of_refuses_unsupported_dtype() -> None:
    odd = torch.zeros(2, dtype=torch.float8_e4m3fn)
    with pytest.raises(StateMismatch, match="'odd'"):
        header_of({"fine": torch.zeros(1), "odd": odd})


def test_tensor_spec_validation() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec(name="a", dtype="float128", shape=(1,))
    with pytest.raises(ValueError, match="negative"):
        TensorSpec(name="a", dtype="float32", shape=(2, -1))
    with pytest.raises(ValueError):
        TensorSpec(name="", dtype="float32", shape=(1,))


# -- check_header -------------------------------------------------------------------------------------------------


def _header(*specs: tuple[str, str, tuple[int, ...]]) -> StateHeader:
    return StateHeader(tensors=tuple(TensorSpec(name=n, dtype=d, shape=s) for n, d, s in specs))


def test_check_header_accepts_at_the_limits() -> None:
    header = _header(("abcd", "float32", (3, 3)), ("b", "int64", ()))
    limits = Limits(max_tensors=2, max_tensor_elements=9, max_state_bytes=9 * 4 + 8, max_name_chars=4, max_dims=2)
    check_header(header, limits)


def test_check_header_too_many_tensors() -> None:
    header = _header(("a", "float32", (1,)), ("b", "float32", (1,)), ("c", "float32", (1,)))
    with pytest.raises(LimitExceeded, match="3 tensors, limit is 2"):
        check_header(header, Limits(max_tensors=2))


def test_check_header_too_many_elements() -> None:
    header = _header(("small", "float32", (3,)), ("big", "uint8", (2, 5)))
    with pytest.raises(LimitExceeded, match="'big' has 10 elements, limit is 9"):
        check_header(header, Limits(max_tensor_elements=9))


def test_check_header_huge_shape_does_not_allocate() -> None:
    header = _header(("huge", "float64", (1 << 40, 1 << 40)))
    with pytest.raises(LimitExceeded, match="'huge'"):
        check_header(header, Limits())


def test_check_header_state_too_large() -> None:
    header = _header(("a", "float32", (4,)), ("b", "float64", (2,)))
    check_header(header, Limits(max_state_bytes=32))
    with pytest.raises(LimitExceeded, match="32 bytes, limit is 31"):
        check_header(header, Limits(max_state_bytes=31))


def test_check_header_duplicate_names() -> None:
    header = _header(("a", "float32", (1,)), ("b", "float32", (1,)), ("a", "int64", (1,)))
    with pytest.raises(MalformedFrame, match="'a' twice"):
        check_header(header, Limits())


def test_check_header_name_too_long() -> None:
    header = _header(("abcde", "float32", (1,)))
    with pytest.raises(LimitExceeded, match="5 characters, limit is 4"):
        check_header(header, Limits(max_name_chars=4))


def test_check_header_too_many_dims() -> None:
    header = _header(("deep", "float32", (1, 1, 1)))
    with pytest.raises(LimitExceeded, match="'deep' has 3 dimensions, limit is 2"):
        check_header(header, Limits(max_dims=2))


EXPECTED = _header(("w", "float32", (2, 3)), ("b", "float32", (3,)), ("n", "int64", ()))


def test_check_header_expected_matches_in_any_order() -> None:
    check_header(_header(("n", "int64", ()), ("b", "float32", (3,)), ("w", "float32", (2, 3))), Limits(), expected=EXPECTED)


@pytest.mark.parametrize(
    ("got", "words"),
    [
        pytest.param(_header(("w", "float32", (2, 3)), ("n", "int64", ())), ["missing b"], id="missing"),
        pytest.param(
            _header(("w", "float32", (2, 3)), ("b", "float32", (3,)), ("n", "int64", ()), ("sneaky", "uint8", (9,))),
            ["unexpected sneaky"],
            id="extra",
        ),
        pytest.param(
            _header(("w", "float32", (3, 2)), ("b", "float32", (3,)), ("n", "int64", ())),
            ["w float32[3, 2] where w float32[2, 3] was expected"],
            id="shape",
        ),
        pytest.param(
            _header(("w", "float32", (2, 3)), ("b", "float16", (3,)), ("n", "int64", ())),
            ["b float16[3] where b float32[3] was expected"],
            id="dtype",
        ),
        pytest.param(
            _header(("w", "float64", (2, 3)), ("n", "int64", ()), ("x", "float32", (3,))),
            ["missing b", "unexpected x", "w float64[2, 3] where w float32[2, 3] was expected"],
            id="several",
        ),
    ],
)
def test_check_header_expected_mismatch(got: StateHeader, words: list[str]) -> None:
    with pytest.raises(StateMismatch) as refused:
        check_header(got, Limits(), expected=EXPECTED)
    for word in words:
        assert word in str(refused.value)


def test_check_header_limits_before_expected() -> None:
    """A peer cannot get past the limits by matching the model: limits come first."""
    with pytest.raises(LimitExceeded):
        check_header(EXPECTED, Limits(max_tensors=2), expected=EXPECTED)


# -- decode_state refusals ----------------------------------------------------------------------------------------


def _doc(*entries: object, v: object = 1) -> bytes:
    return msgpack.packb({"v": v, "tensors": list(entries)}, use_bin_type=True)


def _entry(**override: object) -> dict[str, object]:
    entry: dict[str, object] = {"name": "x", "dtype": "float32", "shape": [2], "data": b"\x00" * 8}
    entry.update(override)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x82\xa1v", id="truncated-map"),
        pytest.param(TINY_DOC + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb([1, 2, 3]), id="array"),
        pytest.param(msgpack.packb(7), id="int"),
        pytest.param(msgpack.packb({"v": 1}), id="no-tensors"),
        pytest.param(msgpack.packb({"v": 1, "tensors": {}}), id="tensors-not-list"),
        pytest.param(msgpack.packb({1: 2}), id="int-key"),
        pytest.param(_doc(v=2), id="version-2"),
        pytest.param(_doc(v="1"), id="version-str"),
        pytest.param(_doc(7), id="entry-int"),
        pytest.param(_doc("x"), id="entry-str"),
        pytest.param(_doc([1, 2]), id="entry-list"),
        pytest.param(_doc(None), id="entry-nil"),
        pytest.param(_doc(_entry(name=_DROP)), id="no-name"),
        pytest.param(_doc(_entry(dtype=_DROP)), id="no-dtype"),
        pytest.param(_doc(_entry(shape=_DROP)), id="no-shape"),
        pytest.param(_doc(_entry(data=_DROP)), id="no-data"),
        pytest.param(_doc(_entry(name=3)), id="name-int"),
        pytest.param(_doc(_entry(name="")), id="name-empty"),
        pytest.param(_doc(_entry(dtype="float128")), id="dtype-unknown"),
        pytest.param(_doc(_entry(dtype=None)), id="dtype-nil"),
        pytest.param(_doc(_entry(shape=2)), id="shape-int"),
        pytest.param(_doc(_entry(shape=None)), id="shape-nil"),
        pytest.param(_doc(_entry(shape=[-2])), id="shape-negative"),
        pytest.param(_doc(_entry(shape=[[2]])), id="shape-nested"),
        pytest.param(_doc(_entry(shape=[2.5])), id="shape-float"),
        pytest.param(_doc(_entry(data=b"\x00" * 7)), id="data-short"),
        pytest.param(_doc(_entry(data=b"\x00" * 9)), id="data-long"),
        pytest.param(_doc(_entry(data="\x00" * 8)), id="data-str"),
        pytest.param(_doc(_entry(data=None)), id="data-nil"),
        pytest.param(_doc(_entry(), _entry()), id="duplicate-name"),
        pytest.param(b"\x82\xa1v\x01\xa7tensors\x91\xc7\x01\x05x", id="ext-type"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="deeply-nested"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-length"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="huge-bin-length"),
    ],
)
def test_decode_state_refuses_bad_documents(data: bytes) -> None:
    with pytest.raises((MalformedFrame, LimitExceeded)):
        decode_state(data)


@pytest.mark.parametrize("cut", range(0, len(TINY_DOC)))
def test_decode_state_truncated(cut: int) -> None:
    with pytest.raises((MalformedFrame, LimitExceeded)):
        decode_state(TINY_DOC[:cut])


def test_decode_state_not_bytes() -> None:
    with pytest.raises(MalformedFrame):
        decode_state("not bytes")  # type: ignore[arg-type]
    with pytest.raises(MalformedFrame):
        decode_state(None)  # type: ignore[arg-type]


def test_decode_state_within_limits() -> None:
    decode_state(TINY_DOC, Limits(max_tensors=2, max_tensor_elements=2, max_state_bytes=16, max_dims=1, max_name_chars=1))


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (Limits(max_tensors=1), "2 tensors, limit is 1"),
        (Limits(max_tensor_elements=1), "'x' has 2 elements"),
        (Limits(max_state_bytes=15), "16 bytes, limit is 15"),
    ],
)
def test_decode_state_applies_limits(limits: Limits, match: str) -> None:
    with pytest.raises(LimitExceeded, match=match):
        decode_state(TINY_DOC, limits)


def test_decode_state_refuses_oversized_data_before_allocating() -> None:
    limits = Limits(max_state_bytes=100)
    with pytest.raises((LimitExceeded, MalformedFrame)):
        decode_state(_doc(_entry(shape=[1000], data=b"\x00" * 4000)), limits)


_VALID = [TINY_DOC, encode_state({"a": torch.zeros(2, 2, dtype=torch.float16), "b": torch.tensor(True)}), _doc()]

_edits = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
    min_size=1,
    max_size=4,
)

_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)

_entries = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["a", "b", ""]) | _json_like,
            "dtype": st.sampled_from(sorted(DTYPES)) | _json_like,
            "shape": st.lists(st.integers(-2, 4), max_size=3) | _json_like,
            "data": st.binary(max_size=40) | _json_like,
        },
    )
    | _json_like,
    max_size=3,
)


def _only_codec_errors(data: bytes) -> None:
    try:
        state = decode_state(data, Limits(max_state_bytes=1 << 20))
    except (MalformedFrame, LimitExceeded):
        return
    for tensor in state.values():  # what is accepted is a real state
        assert isinstance(tensor, torch.Tensor)


def _fuzz_bytes(data: bytes) -> None:
    _only_codec_errors(data)


def _fuzz_mutations(which: bytes, edits: list[tuple[int, int, str]], cut: int | None) -> None:
    _only_codec_errors(corrupt(which, edits, cut=cut))


def _fuzz_structure(entries: list[object]) -> None:
    _only_codec_errors(_doc(*entries))


_BYTES = given(data=st.binary(max_size=512))
_MUTATIONS = given(which=st.sampled_from(_VALID), edits=_edits, cut=st.none() | st.integers(0, 1 << 16))
_STRUCTURE = given(entries=_entries)

test_decode_state_fuzz_bytes = FUZZ(_BYTES(_fuzz_bytes))
test_decode_state_fuzz_mutations = settings(FUZZ, max_examples=150)(_MUTATIONS(_fuzz_mutations))
test_decode_state_fuzz_structure = settings(FUZZ, max_examples=100)(_STRUCTURE(_fuzz_structure))

_LONG = settings(FUZZ, max_examples=20_000)
test_decode_state_fuzz_bytes_long = pytest.mark.slow(_LONG(_BYTES(_fuzz_bytes)))
test_decode_state_fuzz_mutations_long = pytest.mark.slow(_LONG(_MUTATIONS(_fuzz_mutations)))
test_decode_state_fuzz_structure_long = pytest.mark.slow(_LONG(_STRUCTURE(_fuzz_structure)))


# -- the assembler ------------------------------------------------------------------------------------------------


def test_assembler_refuses_extra_bytes() -> None:
    state = {"a": torch.arange(3, dtype=torch.int32)}
    assembler = StateAssembler(header_of(state))
    assembler.feed(_bits(state["a"]).numpy().tobytes())
    assert assembler.done
    with pytest.raises(TransferError, match="more bytes than the header announced"):
        assembler.feed(b"\x00")


def test_assembler_refuses_overlong_last_chunk() -> None:
    state = {"a": torch.arange(3, dtype=torch.int32), "b": torch.tensor(True)}
    assembler = StateAssembler(header_of(state))
    with pytest.raises(TransferError, match="more bytes"):
        assembler.feed(b"\x01" * 14)


def test_assembler_refuses_empty_chunk() -> None:
    assembler = StateAssembler(header_of({"a": torch.zeros(1)}))
    with pytest.raises(TransferError, match="empty"):
        assembler.feed(b"")


def test_assembler_incomplete_result() -> None:
    assembler = StateAssembler(header_of({"a": torch.zeros(4)}))
    assembler.feed(b"\x00" * 10)
    assert not assembler.done and assembler.received == 10
    with pytest.raises(TransferError, match="10 of 16 bytes"):
        assembler.result()


@pytest.mark.parametrize(
    "state",
    [
        {"a": torch.zeros(5)},
        {"b": torch.zeros(4)},
        {"a": torch.zeros(2, dtype=torch.float64)},  # same number of bytes, other dtype
        {"a": torch.zeros(2, 2)},  # same number of bytes, other shape
    ],
    ids=["longer", "missing", "dtype", "shape"],
)
def test_iter_state_chunks_refuses_a_state_its_header_does_not_describe(state: State) -> None:
    header = header_of({"a": torch.zeros(4)})
    with pytest.raises(StateMismatch, match="'a'"):
        list(iter_state_chunks(state, header, 4096))


def test_lazy_conjugate_and_negative_views_round_trip() -> None:
    z = torch.complex(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -0.0]))
    state = {"conj": z.conj(), "neg": torch._neg_view(z), "imag_of_conj": z.conj().imag}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    want = {name: t.resolve_conj().resolve_neg() for name, t in state.items()}
    assert_bit_exact(decode_state(encode_state(state)), want)
    assert_bit_exact(assemble(state, 7), want)


# -- many small tensors -------------------------------------------------------------------------------------------


def test_small_tensors_are_received_into_shared_buffers_of_at_most_a_mebibyte() -> None:
    """Runs of small same-dtype tensors share one buffer; a dtype change, a large tensor or a full buffer ends a run."""
    g = torch.Generator().manual_seed(7)
    state: State = {f"small{i}": torch.randn(2560, generator=g) for i in range(300)}  # 10 KiB each, 3 MiB in all
    state["flag"] = torch.tensor([True, False, True])  # a run of another dtype, 3 bytes: misaligns what follows
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0)
    state["big"] = torch.randn(40_000, generator=g)  # 160 KiB: a buffer of its own
    state["bf16"] = torch.randn(7, generator=g).to(torch.bfloat16)
    state["tail"] = torch.randn(3, 5, generator=g)
    got = assemble(state, 1000)
    assert_bit_exact(got, state)
    storages: dict[int, list[str]] = {}
    for name, tensor in got.items():
        if tensor.numel():
            storages.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    groups = list(storages.values())
    assert ["big"] in groups and ["flag"] in groups and ["bf16"] in groups and ["tail"] in groups
    runs = [group for group in groups if group[0].startswith("small")]
    assert [len(group) for group in runs] == [102, 102, 96], "10 KiB tensors, 102 to a mebibyte"
    assert ["scalar"] in groups, "a float32 scalar after the bool run starts a new buffer"
    assert all(got[name].is_contiguous() for name in got)


def test_a_kept_small_tensor_can_be_written_without_touching_its_neighbours() -> None:
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(10)}
    got = assemble(state, 64)
    got["t3"].add_(100.0)
    assert_bit_exact({k: v for k, v in got.items() if k != "t3"}, {k: v for k, v in state.items() if k != "t3"})


def test_the_fast_tensor_spec_equals_pydantics_own() -> None:
    from fedlink.protocol import tensors

    assert tensors._trusted_spec is tensors._construct_spec, "this pydantic version needs model_construct"
    for name, tensor in {"w": torch.zeros(2, 3), "s": torch.tensor(1), "e": torch.zeros(0, 4)}.items():
        fast = header_of({name: tensor}).tensors[0]
        validated = TensorSpec(name=name, dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(tensor.shape))
        assert fast == validated and hash(fast) == hash(validated) and fast.model_dump() == validated.model_dump()
        assert StateHeader(tensors=(fast,)) == StateHeader(tensors=(validated,))
        with pytest.raises(Exception, match="frozen"):
            fast.name = "other"  # type: ignore[misc]


def test_headers_of_an_unchanged_layout_reuse_their_specs_and_follow_any_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlink.protocol import tensors

    state = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.tensor(4)}
    first = header_of(state)
    again = header_of({name: value.clone() for name, value in state.items()})  # other tensors, same layout
    assert again == first and all(a is b for a, b in zip(again.tensors, first.tensors))
    changed = header_of({"w": torch.zeros(3, 2), "b": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(4)})
    assert [spec.describe() for spec in changed.tensors] == ["w float32[3, 2]", "b float16[3]", "n int64[]"]
    assert header_of(state) == first  # the old layout is still known
    # The cache never outgrows its bound: it starts over instead.
    monkeypatch.setattr(tensors, "_SPECS", {})
    monkeypatch.setattr(tensors, "_SPECS_MAX", 4)
    for i in range(10):
        assert header_of({f"t{i}": torch.zeros(i)}).tensors[0].describe() == f"t{i} float32[{i}]"
        assert len(tensors._SPECS) <= 4
