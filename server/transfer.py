"""How the global state and each update travel to and from one worker: the run's compression, download dtype and
trainable-only uploads, negotiated against what the worker's hello offers.

``training.compression``, ``training.download`` and ``training.upload`` are what the operator wants; a worker gets
them only if its hello lists the capability (:mod:`fedlink.protocol.capabilities`). One that does not (an older
fedlink) trains and uploads as before, and the coordinator says so once per worker, not once per round.

With ``training.upload: trainable`` (the default) a model's frozen parameters (``requires_grad=False``, a frozen
backbone) never travel back: their update is known without asking (unchanged weights, zero deltas and gradients).
The train stage leaves them out of the fold (:meth:`TransferFormat.for_fold`) and the new global state keeps them
as they were (:meth:`TransferFormat.keep_frozen`), so the coordinator holds no running sum for a frozen backbone.
FedBuff's fold still takes the whole update: :meth:`WorkerTransfer.complete` puts back what the worker left out
(the global tensor itself for ``weights``, stride-0 zeros otherwise).

With ``training.send_only_changed`` (the default) a worker keeps the frozen parameters of the last global state it
was sent, and the next request leaves out those that did not change since (:class:`StateVersions`): a frozen
backbone travels once per worker, not every round. (It keeps nothing else: the model it trains takes the received
tensors as its own and changes them in place, so that a large model is held once, not twice; and a trained tensor
changes every round anyway.) The coordinator counts a tensor as changed when its values differ (``torch.equal``)
from the round before, and believes a worker keeps a state only if the worker trained on it over the session it
still has: a worker that restarted or reconnected, or failed its last request, is sent everything again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedlink.compression import (
    CompressionError,
    CompressionSpec,
    DownloadDtype,
    cast_download,
    DecodedState,
    download_header,
    wire_header,
)
from fedlink.protocol import capabilities
from fedlink.protocol.limits import Limits
from fedlink.protocol.messages import HookSpec, StateCache, TrainingPlan, UpdateKind
from fedlink.protocol.session import Inbound, Session
from fedlink.protocol.spill import LazyState, Spill, subset
from fedlink.protocol.tensors import DTYPES, State, StateHeader

from .errors import InvalidUpdate
from .remote import RemoteWorker

__all__ = ["TransferFormat", "WorkerTransfer", "upload_slots"]

log = logging.getLogger("fedlink.server")


def upload_slots(
    limits: Limits, update_header: StateHeader, *, spills: bool = False, compression: CompressionSpec | None = None
) -> int:
    """How many updates may be received or wait for their turn at once: ``limits.concurrent_uploads``, fewer when
    that many updates held in memory would take more than ``limits.upload_buffer_bytes``.

    With ``spills`` (the train stage) an update of at least ``limits.spill_bytes`` as sent waits on disk, not in
    memory (see :mod:`fedlink.protocol.spill`), so it takes no room in the buffer. A compressed update
    (``compression``) waits as sent, and is decoded a slice at a time as it is checked and folded
    (:class:`~fedlink.compression.DecodedState`); a worker that does not offer the scheme sends a plain one.
    """
    def in_memory(nbytes: int) -> int:
        return 0 if spills and nbytes >= limits.spill_bytes else nbytes

    held = in_memory(update_header.nbytes)
    if compression is not None and compression.name != "none":
        held = max(held, in_memory(wire_header(update_header, compression).nbytes))
    if held == 0:
        return limits.concurrent_uploads
    return max(1, min(limits.concurrent_uploads, limits.upload_buffer_bytes // held))


@dataclass(frozen=True)
class WorkerTransfer:
    """One worker's side of a round: its plan, what it is sent and what it must send back."""

    plan: TrainingPlan
    download: DownloadDtype
    update_header: StateHeader  # the dense update, as the strategy folds it
    sent_header: StateHeader  # the part of it the worker sends: without frozen parameters under upload trainable
    wire_header: StateHeader  # what the worker sends: ``sent_header`` under ``compression``
    compression: CompressionSpec

    async def receive(self, inbound: Inbound, spill: Spill | None) -> tuple[Mapping[str, torch.Tensor], int]:
        """The update announced by ``inbound``, as sent, and how many of its bytes went to disk: a large one is
        written to an unnamed file as it arrives (``spill``), and a compressed one is then decoded from there a slice
        at a time as it is checked and folded (:meth:`dense`)."""
        if spill is not None and spill.wanted(self.wire_header.nbytes):
            return await inbound.fetch_spilled(spill, expected=self.wire_header), self.wire_header.nbytes
        return await inbound.fetch(expected=self.wire_header), 0

    async def dense(self, received: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What :meth:`receive` gave, as the dense update: a plain one as it is, a compressed one through
        :meth:`decode` in a thread (its side tensors are checked whole there)."""
        if self.compression.name == "none":
            return received
        return await asyncio.to_thread(self.decode, received)

    def decode(self, wire: Mapping[str, torch.Tensor]) -> DecodedState:
        """The dense update from what arrived (already checked against ``wire_header``), decoded a tensor at a
        time as the check and the fold read it; a bad encoding is the worker's fault and drops it from the round
        like any other invalid update, before any of it is folded."""
        try:
            return DecodedState(wire, self.sent_header, self.compression)
        except CompressionError as exc:
            raise InvalidUpdate(f"undecodable {self.compression.name} update: {exc}") from None

    def complete(
        self, sent: Mapping[str, torch.Tensor], global_state: State, kind: UpdateKind
    ) -> Mapping[str, torch.Tensor]:
        """The whole update, in ``update_header`` order: what was sent, and for each frozen parameter left out the
        value it is known to have (see the module's docstring). A spilled update stays on disk."""
        if len(self.sent_header.tensors) == len(self.update_header.tensors):
            return sent
        known: State = {}
        for spec in self.update_header.tensors:
            if spec.name in sent:
                continue
            if kind == "weights":
                known[spec.name] = global_state[spec.name]
            else:
                known[spec.name] = torch.zeros((), dtype=DTYPES[spec.dtype]).expand(spec.shape)
        order = tuple(spec.name for spec in self.update_header.tensors)
        if isinstance(sent, LazyState):
            return sent.with_held(order, known)
        return {name: known[name] if name in known else sent[name] for name in order}


class StateVersions:
    """A version per tracked tensor of the global state (the frozen parameters: the only ones a worker keeps), and
    keys naming whole states, unique to this coordinator process (a resumed coordinator never names a state a
    worker kept from before)."""

    def __init__(self, tracked: frozenset[str] = frozenset()) -> None:
        self._prefix = secrets.token_hex(6)
        self._round = 0
        self.tracked = tracked
        self.versions: dict[str, int] = {}

    def start(self, state: State) -> None:
        """The global state a run starts (or resumes) from: every tracked tensor at version 0 of a new key."""
        self._round += 1
        self.versions = {name: 0 for name in state if name in self.tracked}

    @property
    def key(self) -> str:
        return f"{self._prefix}.{self._round}"

    def advance(self, old: State, new: State) -> None:
        """The global state went from ``old`` to ``new``: bump the version of every tracked tensor whose values
        changed. Only those are compared: the others change every round and are always sent."""
        self._round += 1
        versions = dict(self.versions)  # replaced, never changed in place: workers' snapshots share it
        for name in self.versions:
            value, before = new[name], old.get(name)
            if before is None or not (
                before is value or (before.shape == value.shape and before.dtype == value.dtype and torch.equal(before, value))
            ):
                versions[name] = self._round
        self.versions = versions


@dataclass(frozen=True)
class _Kept:
    session: Session | None
    download: str
    versions: dict[str, int]
    key: str


@dataclass
class TransferFormat:
    """The run's wish; :meth:`negotiate` turns it into each worker's :class:`WorkerTransfer`."""

    compression: CompressionSpec = field(default_factory=CompressionSpec)
    download: DownloadDtype = "float32"
    upload: Literal["trainable", "all"] = "trainable"
    frozen: frozenset[str] = frozenset()  # the model's parameters with requires_grad False
    send_only_changed: bool = True
    versions: StateVersions = field(init=False)
    _told: set[tuple[str, str]] = field(default_factory=set)  # (worker, capability) already warned about
    _kept: dict[str, _Kept] = field(default_factory=dict)  # what each worker keeps, as far as we know
    _pending: dict[str, _Kept] = field(default_factory=dict)  # sent, not yet trained on
    _header_cache: dict[tuple[int, bool, CompressionSpec], tuple[StateHeader, StateHeader, StateHeader]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        self.versions = StateVersions(self.frozen if self.send_only_changed else frozenset())

    @property
    def folds_frozen(self) -> bool:
        """Whether the round's fold covers the frozen parameters: only under ``training.upload: all``. Otherwise
        their update is known (unchanged weights, zero deltas and gradients), so they are left out of the fold
        (no accumulator for a frozen backbone) and the new global state keeps them exactly (:meth:`keep_frozen`)."""
        return not self.frozen or self.upload == "all"

    def for_fold(self, update_header: StateHeader, received: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What of a worker's update goes into the fold when :attr:`folds_frozen` is False: the tensors that are
        not frozen, whether the worker left the frozen ones out or (an older fedlink) sent them."""
        return subset(received, tuple(t.name for t in update_header.tensors if t.name not in self.frozen))

    def keep_frozen(self, new_state: State, global_state: State) -> State:
        """``new_state`` with each frozen parameter the fold left out taken from ``global_state`` as it is."""
        missing = [name for name in self.frozen if name in global_state and name not in new_state]
        if not missing:
            return new_state
        return {name: new_state[name] if name in new_state else value for name, value in global_state.items()}

    def cache_for(self, worker: RemoteWorker, download: str) -> tuple[StateCache | None, frozenset[str]]:
        """Whether ``worker`` is sent only what changed: the request's cache field and the tensors left out.

        What the worker kept is forgotten here and remembered again only by :meth:`confirm`, once it has trained
        on the new state: a request that fails leaves the coordinator believing nothing, so the next is whole."""
        kept = self._kept.pop(worker.name, None)
        session = worker.session
        if not self.send_only_changed or session is None or capabilities.DOWNLOAD_CACHED not in session.peer_hello.capabilities:
            return None, frozenset()
        snapshot = self.versions.versions  # replaced by advance(), never changed in place: no copy per worker
        key = f"{self.versions.key}.{download}"
        self._pending[worker.name] = _Kept(session, download, snapshot, key)
        if kept is None or kept.session is not session or kept.download != download:
            return StateCache(key=key), frozenset()
        # Only frozen parameters are tracked, the only tensors a worker keeps: training changes the others in place.
        omitted = frozenset(name for name, version in snapshot.items() if kept.versions.get(name, -1) == version)
        return StateCache(base=kept.key, key=key), omitted

    def confirm(self, worker: str) -> None:
        """``worker`` trained on what it was last sent: it keeps that state now."""
        pending = self._pending.pop(worker, None)
        if pending is not None:
            self._kept[worker] = pending

    def negotiate(self, worker: RemoteWorker, plan: TrainingPlan, update_header: StateHeader) -> WorkerTransfer:
        # What the live session's peer said: a worker's own hello, or for a simulation's virtual worker its host's.
        session = worker.session
        hello = session.peer_hello if session is not None else worker.hello
        offered = set(hello.capabilities) if hello is not None else set()
        compression = CompressionSpec()
        if self.compression.name != "none" and self._offers(worker, offered, capabilities.compress(self.compression.name)):
            compression = self.compression
            plan = plan.with_hook(
                HookSpec(name="compress", params={
                    "scheme": compression.name, "ratio": compression.ratio, "dense_below": compression.dense_below,
                })
            )
        download: DownloadDtype = "float32"
        if self.download != "float32" and self._offers(worker, offered, capabilities.download(self.download)):
            download = self.download
            plan = plan.model_copy(update={"download": download})
        trimmed = bool(self.frozen) and self.upload == "trainable" and self._offers(
            worker, offered, capabilities.UPLOAD_TRAINABLE
        )
        if trimmed:
            plan = plan.model_copy(update={"upload": "trainable"})
        sent_header, wire = self._headers(update_header, trimmed, compression)
        return WorkerTransfer(
            plan=plan,
            download=download,
            update_header=update_header,
            sent_header=sent_header,
            wire_header=wire,
            compression=compression,
        )

    def _headers(
        self, update_header: StateHeader, trimmed: bool, compression: CompressionSpec
    ) -> tuple[StateHeader, StateHeader]:
        """What a worker sends (dense, and on the wire): the same for every worker granted the same, so computed
        once per round and kind of worker rather than once per worker (a thousand workers share a few entries)."""
        key = (id(update_header), trimmed, compression)
        cached = self._header_cache.get(key)
        if cached is None or cached[0] is not update_header:
            sent = update_header
            if trimmed:
                sent = StateHeader(tensors=tuple(t for t in update_header.tensors if t.name not in self.frozen))
            cached = (update_header, sent, wire_header(sent, compression))
            if len(self._header_cache) > 8:
                self._header_cache.clear()
            self._header_cache[key] = cached
        return cached[1], cached[2]

    def _offers(self, worker: RemoteWorker, offered: set[str], wanted: str) -> bool:
        if wanted in offered:
            return True
        if (worker.name, wanted) not in self._told:
            self._told.add((worker.name, wanted))
            log.warning(
                "worker %r does not offer %s (an older fedlink?): it trains and uploads without it", worker.name, wanted
            )
        return False


class DownloadCache:
    """The global state cast for the download, made once per round and only if some worker takes it."""

    def __init__(self, state: State, header: StateHeader) -> None:
        self.state, self.header = state, header
        self._cast: dict[str, tuple[State, StateHeader]] = {}

    def get(self, dtype: DownloadDtype) -> tuple[State, StateHeader]:
        if dtype == "float32":
            return self.state, self.header
        if dtype not in self._cast:
            self._cast[dtype] = cast_download(self.state, dtype), download_header(self.header, dtype)
        return self._cast[dtype]
