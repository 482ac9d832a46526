"""Update compression as pure code: wire layout, round trips, unbiased int8, top-k error feedback, hostile input."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.compression import (
    INDEX_PREFIX,
    SCALE_PREFIX,
    CompressionError,
    CompressionHook,
    CompressionSpec,
    DecodedState,
    cast_download,
    compress,
    decompress,
    download_header,
    wire_header,
)
from fedlink.hooks import HookContext
from fedlink.protocol.spill import slices_of, subset, tensor_meta, tensor_slices
from fedlink.protocol.tensors import StateHeader, header_of
from fedlink.server.aggregate import WeightedSum, scan_update, tensor_peaks

State = dict[str, torch.Tensor]


def update(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(40, 50, generator=g),
        "fc.bias": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "tiny": torch.randn(1, generator=g),
    }


def through(value: State, spec: CompressionSpec, residual: State | None = None, seed: int = 1) -> tuple[State, State]:
    """Compress, check the result against the announced wire header, decode: what the coordinator folds."""
    wire, kept = compress(value, spec, generator=torch.Generator().manual_seed(seed), residual=residual)
    assert header_of(wire) == wire_header(header_of(value), spec)
    return decompress(dict(wire), header_of(value), spec), kept


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "topk"])
def test_wire_header_is_what_compress_sends_and_decoding_restores_the_dense_header(name: str) -> None:
    value = update()
    dense, _ = through(value, CompressionSpec(name=name, ratio=0.05))
    assert header_of(dense) == header_of(value)
    assert torch.equal(dense["bn.num_batches_tracked"], value["bn.num_batches_tracked"])  # integers travel as they are


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "topk"])
def test_a_decoded_state_reads_and_folds_to_the_same_bits_as_the_whole_decode(name: str) -> None:
    """The coordinator's path (a tensor decoded when read, checked, then folded) against decoding at once."""
    value, spec = update(), CompressionSpec(name=name, ratio=0.05, dense_below=0)
    wire, _ = compress(value, spec, generator=torch.Generator().manual_seed(1))
    header = header_of(value)
    whole = decompress(dict(wire), header, spec)
    lazy = DecodedState(dict(wire), header, spec)
    assert list(lazy) == list(header.by_name()) and len(lazy) == len(whole)
    assert all(tensor_meta(lazy, k) == (v.dtype, tuple(v.shape)) for k, v in whole.items())
    assert all(torch.equal(lazy[k], v) for k, v in whole.items())
    for k, v in whole.items():  # decoded a slice at a time: the same boundaries and bits as slicing the whole
        pieces = [(start, part.clone()) for start, part in tensor_slices(lazy, k, 64)]
        expected = list(slices_of(v, 64))
        assert [s for s, _ in pieces] == [s for s, _ in expected]
        assert all(torch.equal(p.reshape(-1), e.reshape(-1)) for (_, p), (_, e) in zip(pieces, expected))
    scan = scan_update(lazy)
    assert scan == scan_update(whole) and tensor_peaks(lazy) is scan.peaks  # the fold does not look again
    sums = []
    for state in (whole, lazy):
        total = WeightedSum()
        total.add(update(5), 2.0)
        total.add(state, 3.0)
        sums.append(total.mean())
    assert all(torch.equal(sums[0][k], sums[1][k]) for k in sums[0])


def test_a_decoded_state_makes_a_dense_tensor_only_when_read_and_keeps_none() -> None:
    value, spec = {"w": torch.randn(3000)}, CompressionSpec(name="topk", ratio=0.01, dense_below=0)
    wire, _ = compress(value, spec, generator=torch.Generator())
    lazy = DecodedState(wire, header_of(value), spec)
    assert lazy["w"] is not lazy["w"]  # decoded on each read, never cached beside the compressed update
    slices = list(tensor_slices(lazy, "w", 1000))
    assert [start for start, _ in slices] == [0, 1000, 2000]
    # Frozen tensors the worker left out join as held tensors; the compressed ones stay compressed.
    part = subset(lazy, ("w",))
    assert isinstance(part, DecodedState)
    held = part.with_held(("frozen", "w"), {"frozen": torch.ones(2)})
    assert list(held) == ["frozen", "w"] and torch.equal(held["w"], lazy["w"])
    with pytest.raises(KeyError, match="'gone'"):
        lazy.with_held(("gone",), {})


def test_bytes_on_the_wire_shrink_as_each_scheme_promises() -> None:
    header = header_of({"w": torch.zeros(1000, 1000)})
    size = {n: wire_header(header, CompressionSpec(name=n, ratio=0.01)).nbytes for n in ("none", "float16", "int8", "topk")}
    assert size["float16"] == size["none"] // 2
    assert size["int8"] == size["none"] // 4 + 4  # one float32 scale
    assert size["topk"] == 10_000 * 8  # 1% of the entries, a float32 value and an int32 index each
    assert size["topk"] / size["none"] == 0.02


def test_float16_and_bfloat16_round_to_nearest() -> None:
    value = update()
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        dense, _ = through(value, CompressionSpec(name=name))
        assert torch.equal(dense["fc.weight"], value["fc.weight"].to(dtype).float())


def test_float16_refuses_values_it_cannot_hold_instead_of_sending_infinities() -> None:
    with pytest.raises(CompressionError, match="'w' does not fit float16.*bfloat16"):
        compress({"w": torch.tensor([1e6, 1.0])}, CompressionSpec(name="float16"), generator=torch.Generator())
    with pytest.raises(CompressionError, match="'w' holds NaN"):
        compress({"w": torch.tensor([math.nan])}, CompressionSpec(name="int8"), generator=torch.Generator())


def test_int8_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    value = {"w": torch.linspace(-1.0, 1.0, 2001) * 0.37}
    spec = CompressionSpec(name="int8")
    step = 0.37 / 127
    draws = torch.stack([through(value, spec, seed=s)[0]["w"] for s in range(400)])
    assert float((draws - value["w"]).abs().max()) <= step * (1 + 1e-6)
    # Each entry's mean over 400 draws: within 5 standard errors (step / 2 / sqrt(400) at most) of the truth.
    assert float((draws.mean(0) - value["w"]).abs().max()) < 5 * step / 2 / 20
    # and not plain round-to-nearest: values between grid points land on both neighbours
    assert len(torch.unique(draws[:, 1001])) == 2


def test_int8_of_an_all_zero_tensor_is_exact() -> None:
    dense, _ = through({"w": torch.zeros(5)}, CompressionSpec(name="int8"))
    assert torch.equal(dense["w"], torch.zeros(5))


def test_topk_sends_the_largest_and_keeps_the_rest_for_the_next_round() -> None:
    value = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 0.01, 0.02, 0.04])}
    spec = CompressionSpec(name="topk", ratio=0.2, dense_below=0)  # k = 2 of 10
    dense, kept = through(value, spec)
    assert torch.equal(dense["w"], torch.tensor([0, -5.0, 0, 3.0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(dense["w"] + kept["w"], value["w"])  # nothing is lost: sent plus kept is the update
    # Next round the residual is added first: -0.3 + -0.3 and 0.2 + 0.2 now beat the fresh entries.
    small = {"w": torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0, -0.3, 0.0, 0.0, 0.0, 0.0])}
    dense, kept2 = through(small, spec, residual=kept)
    assert torch.equal(dense["w"], torch.tensor([0, 0, 0.4, 0, 0, -0.6, 0, 0, 0, 0]))
    assert torch.allclose(dense["w"] + kept2["w"], small["w"] + kept["w"])


def test_topk_error_feedback_keeps_the_backlog_bounded_while_the_total_grows() -> None:
    """The same update sent 400 times at 1%: sent plus kept is always the whole sum, and what is still held back
    stops growing (without error feedback it would be 99% of the sum, growing every round)."""
    value = {"w": torch.randn(2000, generator=torch.Generator().manual_seed(3))}
    spec = CompressionSpec(name="topk", ratio=0.01, dense_below=0)
    arrived, residual = torch.zeros(2000), None
    backlog = {}
    for r in range(1, 401):
        dense, residual = through(value, spec, residual=residual)
        arrived += dense["w"]
        backlog[r] = float(residual["w"].abs().max())
    assert residual is not None
    assert torch.allclose(arrived + residual["w"], 400 * value["w"], rtol=1e-4, atol=1e-2)
    assert backlog[400] < 1.1 * backlog[200]
    assert backlog[400] < 0.1 * float((400 * value["w"]).abs().max())


def test_topk_sends_tensors_too_small_to_save_anything_dense_and_exact() -> None:
    value = {"w": torch.tensor([1.0, 2.0, 3.0])}
    header = wire_header(header_of(value), CompressionSpec(name="topk", ratio=0.5))
    assert [t.name for t in header.tensors] == ["w"]
    dense, kept = through(value, CompressionSpec(name="topk", ratio=0.5))
    assert torch.equal(dense["w"], value["w"]) and not kept


def test_topk_sends_tensors_under_dense_below_dense_and_exact_and_keeps_no_residual_for_them() -> None:
    """A head or a bias under ``dense_below`` entries travels whole every round; a tensor of that size or more is
    sparse, so the setting decides exactly which tensors the scheme touches."""
    generator = torch.Generator().manual_seed(4)
    value = {"head": torch.randn(99, generator=generator), "body": torch.randn(100, generator=generator)}
    spec = CompressionSpec(name="topk", ratio=0.05, dense_below=100)
    header = wire_header(header_of(value), spec)
    assert [t.describe() for t in header.tensors] == [
        "head float32[99]", "body float32[5]", f"{INDEX_PREFIX}body int32[5]"
    ]
    dense, kept = through(value, spec)
    assert torch.equal(dense["head"], value["head"]) and list(kept) == ["body"]
    assert int((dense["body"] != 0).sum()) == 5
    assert torch.equal(dense["body"] + kept["body"], value["body"])
    assert CompressionSpec(name="topk").dense_below == 4096  # the default the README's table is measured with


def _topk_wire() -> tuple[State, StateHeader, CompressionSpec]:
    value = {"w": torch.arange(100, dtype=torch.float32)}
    spec = CompressionSpec(name="topk", ratio=0.05, dense_below=0)
    wire, _ = compress(value, spec, generator=torch.Generator())
    return wire, header_of(value), spec


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ([95, 96, 97, 98, 100], "out of range 0..99"),
        ([-1, 96, 97, 98, 99], "out of range"),
        ([95, 96, 96, 98, 99], "repeat or are out of order"),
        ([99, 96, 97, 98, 95], "repeat or are out of order"),
    ],
)
def test_a_hostile_topk_index_is_refused_by_name(index: list[int], problem: str) -> None:
    wire, header, spec = _topk_wire()
    wire[INDEX_PREFIX + "w"] = torch.tensor(index, dtype=torch.int32)
    with pytest.raises(CompressionError, match=f"tensor 'w': top-k.*{problem}"):
        DecodedState(wire, header, spec)  # refused whole, before any tensor is read and folded


@pytest.mark.parametrize("scale", [-1.0, math.inf, math.nan])
def test_a_hostile_int8_scale_is_refused_by_name(scale: float) -> None:
    spec = CompressionSpec(name="int8")
    wire, _ = compress({"w": torch.ones(4)}, spec, generator=torch.Generator())
    wire[SCALE_PREFIX + "w"] = torch.tensor(scale)
    with pytest.raises(CompressionError, match="tensor 'w': int8 scale"):
        decompress(wire, header_of({"w": torch.ones(4)}), spec)


def test_side_tensor_names_that_collide_with_the_update_are_refused() -> None:
    header = header_of({"w": torch.zeros(4), SCALE_PREFIX + "w": torch.zeros((), dtype=torch.int64)})
    with pytest.raises(CompressionError, match="repeat tensor names: compress/scale/w"):
        wire_header(header, CompressionSpec(name="int8"))


def test_download_casts_floats_and_keeps_integers() -> None:
    state = {"w": torch.randn(3), "n": torch.tensor(2)}
    sent = cast_download(state, "float16")
    assert sent["w"].dtype == torch.float16 and sent["n"].dtype == torch.int64
    assert header_of(sent) == download_header(header_of(state), "float16")
    assert cast_download(state, "float32") is state


def _hook(server_round: int, store: dict[str, object], scheme: str = "topk") -> CompressionHook:
    context = HookContext(server_round=server_round, run_state=store, generator=torch.Generator().manual_seed(0))
    return CompressionHook(CompressionHook.Params(scheme=scheme, ratio=0.2, dense_below=0), context)  # type: ignore[arg-type]


def test_hook_keeps_the_residual_per_round_so_a_repeated_round_starts_from_the_same_one() -> None:
    store: dict[str, object] = {}
    value = {"w": torch.arange(10, dtype=torch.float32)}
    first = _hook(1, store).transform_update(value)
    second = _hook(2, store).transform_update(value)
    again = _hook(2, store).transform_update(value)  # round 2 run again (coordinator resumed): same input, same output
    assert all(torch.equal(second[k], again[k]) for k in second)
    assert not torch.equal(first["w"], second["w"])  # round 2 carried round 1's residual


def test_hook_without_a_residual_past_round_one_warns_and_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    hook = _hook(5, {})
    hook.transform_update({"w": torch.arange(10, dtype=torch.float32)})
    assert hook.context.metrics["compress_fresh"] == 1.0
    assert "no top-k error-feedback residual" in caplog.text
