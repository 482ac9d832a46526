"""One worker's side of a secure round (Bonawitz et al., CCS 2017, figure 4; Bell et al., CCS 2020), no I/O.

Create one :class:`WorkerSecAgg` per round and feed it the four stage requests in order; each method returns the
stage's result (the masked vector also as packed bytes). The object keeps the round's secrets in memory only and
is dropped at round end. It refuses, with :class:`ProtocolViolation` naming the stage and peer, anything that
would leak: a changed session id or parameters, a neighbour list that does not follow from the session id, too
few workers left, a peer listed as both alive and dropped, or a peer whose other kind of share it already gave
out. After a refusal the object stays refused: a coordinator caught lying gets nothing more this round.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from numpy.typing import NDArray

from . import bitpack, shamir
from .errors import ProtocolViolation, SecAggError
from .keys import KeyPair, decrypt_share, encrypt_share, pairwise_seed, share_key
from .messages import (
    AdvertiseRequest, AdvertiseResult, MaskedInputRequest, MaskedInputResult, PublicKeys, ShareKeysRequest,
    ShareKeysResult, UnmaskRequest, UnmaskResult,
)  # fmt: skip
from .params import SecAggParams
from .prg import SEED_BYTES, add_mask
from .session import Session, derive_session, mask_sign

__all__ = ["WorkerSecAgg", "packed_to_tensor", "tensor_to_packed"]

class WorkerSecAgg:
    """The per-round state machine of a worker: advertise -> share_keys -> masked_input -> unmask."""

    def __init__(self, worker_id: str, *, round: int) -> None:
        self.worker_id = worker_id
        self.round = round
        self.stage = "new"
        self._current = "new"
        self._params: SecAggParams | None = None
        self._session: Session | None = None
        self._c = KeyPair.generate()
        self._s = KeyPair.generate()
        self._self_seed = secrets.token_bytes(SEED_BYTES)
        self._held: dict[str, tuple[int, int]] = {}  # peer -> (share of its self seed, share of its mask key)
        self._senders: frozenset[str] = frozenset()
        self._selected: frozenset[str] = frozenset()
        self._revealed: dict[str, str] = {}  # peer -> "self" or "key": the one kind this worker gave out

    # -- stage 1 ------------------------------------------------------------------------------------------------
    def advertise(self, request: AdvertiseRequest) -> AdvertiseResult:
        with self._guard("advertise", request.round, "new"):
            selected = request.selected
            if len(set(selected)) != len(selected) or self.worker_id not in selected:
                raise self._refuse("the selection repeats a worker or leaves this one out")
            if len(selected) != request.params.num_selected:
                raise self._refuse(f"{len(selected)} selected but the parameters say {request.params.num_selected}")
            self._params = request.params
            self._selected = frozenset(selected)
            self.stage = "advertised"
            return AdvertiseResult(round=self.round, keys=PublicKeys(c=self._c.public.hex(), s=self._s.public.hex()))

    # -- stage 2 ------------------------------------------------------------------------------------------------
    def share_keys(self, request: ShareKeysRequest) -> ShareKeysResult:
        with self._guard("share_keys", request.round, "advertised"):
            assert self._params is not None
            if request.params != self._params:
                raise self._refuse("the parameters changed since the advertise stage")
            mine = request.keys.get(self.worker_id)
            if mine != PublicKeys(c=self._c.public.hex(), s=self._s.public.hex()):
                raise self._refuse("this worker's own public keys are missing or altered", peer=self.worker_id)
            strangers = sorted(set(request.keys) - self._selected)
            if strangers:
                raise self._refuse("keys from a worker that was not selected for the round", peer=strangers[0])
            if len(request.keys) < self._params.min_survivors:
                raise self._refuse(f"only {len(request.keys)} workers advertised keys, fewer than min_survivors")
            session = derive_session(round=self.round, params=self._params, keys=request.keys, stage="share_keys")
            if request.session != session.id.hex():
                raise self._refuse("the session id differs from the one derived from the advertised keys")
            neighbours = session.graph[self.worker_id]
            if sorted(request.neighbours) != list(neighbours):
                raise self._refuse("the neighbour list does not follow from the session id")
            if len(neighbours) + 1 < session.threshold:
                raise self._refuse(f"{len(neighbours)} neighbours and this worker cannot hold shares of threshold {session.threshold}")
            holders = (*neighbours, self.worker_id)  # the owner holds a share too (Bonawitz et al., section 4)
            indices = [session.index[peer] for peer in holders]
            seed_shares = shamir.split(int.from_bytes(self._self_seed, "big"), threshold=session.threshold, indices=indices)
            key_shares = shamir.split(int.from_bytes(self._s.private, "big"), threshold=session.threshold, indices=indices)
            self._held[self.worker_id] = (seed_shares[-1][1], key_shares[-1][1])
            out: dict[str, str] = {}
            for peer, seed_share, key_share in zip(neighbours, seed_shares, key_shares):
                bundle = shamir.share_to_bytes(seed_share) + shamir.share_to_bytes(key_share)
                key = share_key(
                    self._c.agree(session.keys[peer][0], peer=peer), session=session.id,
                    sender=self.worker_id, recipient=peer,
                )  # fmt: skip
                ct = encrypt_share(key, bundle, session=session.id, round=self.round, sender=self.worker_id, recipient=peer)
                out[peer] = ct.hex()
            self._session = session
            self.stage = "shared"
            return ShareKeysResult(round=self.round, session=session.id.hex(), shares=out)

    # -- stage 3 ------------------------------------------------------------------------------------------------
    def masked_input(self, request: MaskedInputRequest, vector: NDArray[np.uint32]) -> tuple[MaskedInputResult, bytes]:
        """Mask ``vector`` (from :func:`fedlink.secagg.quantize.encode_update`); returns the header and packed bytes."""
        with self._guard("masked_input", request.round, "shared"):
            session = self._checked_session(request.session)
            params = session.params
            senders = frozenset(request.senders)
            if len(senders) != len(request.senders) or not senders <= session.keys.keys():
                raise self._refuse("the sender list repeats a worker or names one that never advertised")
            if self.worker_id not in senders:
                raise self._refuse("this worker's own shares are missing from the senders", peer=self.worker_id)
            expected = set(session.graph[self.worker_id]) & senders
            if set(request.shares) != expected:
                odd = sorted(expected.symmetric_difference(request.shares))
                raise self._refuse("the relayed shares do not match the neighbours that sent them", peer=odd[0])
            if len(senders) < params.min_survivors or len(expected) + 1 < session.threshold:
                raise self._refuse(f"too few workers left after sharing keys ({len(senders)})")
            if vector.dtype != np.uint32 or vector.shape != (params.length,):
                raise self._refuse(f"the input vector must be {params.length} uint32 values, got {vector.shape} {vector.dtype}")
            if params.bits < 32 and int(vector.max(initial=0)) >> params.bits:
                raise self._refuse(f"the input vector holds values of more than {params.bits} bits")
            for peer in sorted(expected):
                key = share_key(
                    self._c.agree(session.keys[peer][0], peer=peer), session=session.id,
                    sender=peer, recipient=self.worker_id,
                )  # fmt: skip
                bundle = decrypt_share(
                    key, bytes.fromhex(request.shares[peer]), session=session.id, round=self.round,
                    sender=peer, recipient=self.worker_id,
                )  # fmt: skip
                size = shamir.SHARE_BYTES
                if len(bundle) != 2 * size:
                    raise self._refuse("a share bundle has the wrong size", peer=peer)
                index = session.index[self.worker_id]
                self._held[peer] = (
                    shamir.share_from_bytes(index, bundle[:size])[1], shamir.share_from_bytes(index, bundle[size:])[1]
                )
            masked = vector.copy()
            add_mask(masked, self._self_seed, bits=params.bits)
            for peer in sorted(expected):
                seed = pairwise_seed(self._s.agree(session.keys[peer][1], peer=peer), session=session.id, a=self.worker_id, b=peer)
                add_mask(masked, seed, bits=params.bits, sign=mask_sign(self.worker_id, peer))
            self._senders = senders
            self.stage = "masked"
            header = MaskedInputResult(round=self.round, session=session.id.hex(), length=params.length, bits=params.bits)
            return header, bitpack.pack(masked, params.bits)

    # -- stage 4 ------------------------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResult:
        """Shares for the coordinator: self-mask shares of alive neighbours, key shares of dropped ones."""
        with self._guard("unmask", request.round, "masked"):
            session = self._checked_session(request.session)
            alive, dropped = set(request.alive), set(request.dropped)
            both = sorted(alive & dropped)
            if both:
                raise self._refuse("a worker is listed as both alive and dropped", peer=both[0])
            if len(alive) != len(request.alive) or len(dropped) != len(request.dropped):
                raise self._refuse("the survivor lists repeat a worker")
            if alive | dropped != self._senders:
                odd = sorted((alive | dropped).symmetric_difference(self._senders))
                raise self._refuse("alive and dropped together must be exactly the workers that shared keys", peer=odd[0])
            if self.worker_id not in alive:
                raise self._refuse("this worker is listed as dropped", peer=self.worker_id)
            mine = set(session.graph[self.worker_id]) & self._senders
            alive_here = len(mine & alive) + 1
            if len(alive) < session.params.min_survivors or alive_here < session.threshold:
                raise self._refuse(
                    f"{len(alive)} survivors ({alive_here} among this worker and its neighbours) are fewer than "
                    f"min_survivors {session.params.min_survivors} or threshold {session.threshold}"
                )
            kinds = {peer: ("self" if peer in alive else "key") for peer in mine | {self.worker_id}}
            for peer, kind in kinds.items():
                if self._revealed.get(peer, kind) != kind:
                    raise self._refuse(f"was reported {'dropped' if kind == 'self' else 'alive'} earlier", peer=peer)
            self._revealed.update(kinds)
            width = shamir.SHARE_BYTES
            return UnmaskResult(
                round=self.round, session=session.id.hex(),
                self_mask_shares={p: self._held[p][0].to_bytes(width, "big").hex() for p, k in kinds.items() if k == "self"},
                key_shares={p: self._held[p][1].to_bytes(width, "big").hex() for p, k in kinds.items() if k == "key"},
            )  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------------------------
    def _checked_session(self, claimed: str) -> Session:
        assert self._session is not None
        if claimed != self._session.id.hex():
            raise self._refuse("the session id changed")
        return self._session

    def _refuse(self, message: str, *, peer: str | None = None) -> ProtocolViolation:
        return ProtocolViolation(message, stage=self._current, peer=peer)

    def _guard(self, stage: str, round: int, expected: str) -> _Guard:
        return _Guard(self, stage, round, expected)


class _Guard:
    """Checks order and round before a stage, and marks the worker refused if the stage raises."""

    def __init__(self, worker: WorkerSecAgg, stage: str, round: int, expected: str) -> None:
        self.worker, self.stage, self.round, self.expected = worker, stage, round, expected

    def __enter__(self) -> None:
        worker = self.worker
        worker._current = self.stage
        if worker.stage == "refused":
            raise ProtocolViolation("this worker refused an earlier request of the round", stage=self.stage)
        if worker.stage != self.expected:
            raise ProtocolViolation(f"out of order: the worker is at {worker.stage!r}", stage=self.stage)
        if self.round != worker.round:
            raise ProtocolViolation(f"round {self.round} sent to the state of round {worker.round}", stage=self.stage)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, SecAggError):
            self.worker.stage = "refused"


def packed_to_tensor(packed: bytes) -> torch.Tensor:
    """The packed masked vector as a ``uint8`` tensor, to travel as a one-tensor state named ``masked``."""
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def tensor_to_packed(tensor: torch.Tensor) -> bytes:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ProtocolViolation(f"a packed masked vector is a 1-d uint8 tensor, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.numpy().tobytes()
