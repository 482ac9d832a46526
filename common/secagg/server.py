"""The coordinator's side of a secure round (Bonawitz et al., CCS 2017, figure 4; Bell et al., CCS 2020), no I/O.

One :class:`ServerSecAgg` per round. For each stage the round engine sends the requests this object makes, feeds
it every result that arrives before the stage's deadline, then asks for the next stage's requests, which closes
the previous stage: whoever did not answer is dropped for the rest of the round (the survivor set only shrinks).
Masked vectors are folded into one running sum as they arrive, so memory stays at one vector whatever n is.
:meth:`ServerSecAgg.finish` rebuilds the self-mask seeds of the survivors and the mask keys of workers lost after
sharing keys, removes those masks and returns the sum of the survivors' vectors mod 2^bits. Too few survivors at
any step raises :class:`TooFewSurvivors` naming who was lost at which stage; nothing is released then.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from . import bitpack, shamir
from .errors import ProtocolViolation, ReconstructionFailed, TooFewSurvivors
from .keys import agree, pairwise_seed, public_from_private
from .messages import (
    AdvertiseRequest, AdvertiseResult, MaskedInputRequest, MaskedInputResult, PublicKeys, ShareKeysRequest,
    ShareKeysResult, UnmaskRequest, UnmaskResult,
)  # fmt: skip
from .params import SecAggParams
from .prg import add_mask
from .session import Session, derive_session, mask_sign

__all__ = ["ServerSecAgg"]

_ORDER = ("advertise", "share_keys", "masked_input", "unmask")


class ServerSecAgg:
    """Collects, routes and sums; learns the survivors' sum and nothing per worker."""

    def __init__(self, *, round: int, params: SecAggParams, selected: Sequence[str]) -> None:
        if len(set(selected)) != len(selected) or len(selected) != params.num_selected:
            raise ProtocolViolation(f"{len(selected)} selected ids (distinct) must match num_selected {params.num_selected}")
        self.round, self.params, self.selected = round, params, sorted(selected)
        self.stage = "advertise"
        self.survivors: dict[str, list[str]] = {"selected": self.selected}
        self._keys: dict[str, PublicKeys] = {}
        self._session: Session | None = None
        self._bundles: dict[str, dict[str, str]] = {}  # sender -> recipient -> ciphertext
        self._sum = np.zeros(params.length, dtype=np.uint32)
        self._masked: set[str] = set()
        self._unmask: dict[str, UnmaskResult] = {}

    @property
    def dropped(self) -> dict[str, list[str]]:
        """Stage -> workers lost there (did not answer that stage's request), for messages and metrics."""
        out, before = {}, self.selected
        for stage, key in zip(_ORDER, ("advertised", "shared", "masked", "unmasked")):
            if key in self.survivors:
                out[stage] = sorted(set(before) - set(self.survivors[key]))
                before = self.survivors[key]
        return out

    def advertise_request(self) -> AdvertiseRequest:
        return AdvertiseRequest(round=self.round, params=self.params, selected=self.selected)

    def receive_advertise(self, worker: str, result: AdvertiseResult) -> None:
        self._expect("advertise", worker, result.round, self.selected)
        self._keys[worker] = result.keys

    def share_keys_requests(self) -> dict[str, ShareKeysRequest]:
        """Closes the advertise stage; one request per worker that advertised."""
        self._close("advertise", "advertised", sorted(self._keys))
        session = self._session = derive_session(round=self.round, params=self.params, keys=self._keys, stage="advertise")
        return {
            w: ShareKeysRequest(
                round=self.round, session=session.id.hex(), params=self.params, keys=self._keys,
                neighbours=list(session.graph[w]),
            )  # fmt: skip
            for w in self.survivors["advertised"]
        }

    def receive_shares(self, worker: str, result: ShareKeysResult) -> None:
        session = self._in_session("share_keys", worker, result.round, result.session, self.survivors["advertised"])
        if set(result.shares) != set(session.graph[worker]):
            raise ProtocolViolation("share bundles must go to exactly the sender's neighbours", stage="share_keys", peer=worker)
        self._bundles[worker] = dict(result.shares)

    def masked_input_requests(self) -> dict[str, MaskedInputRequest]:
        """Closes the share-keys stage; each worker gets the bundles its neighbours addressed to it."""
        senders = self._close("share_keys", "shared", sorted(self._bundles))
        session = self._checked()
        return {
            w: MaskedInputRequest(
                round=self.round, session=session.id.hex(), senders=senders,
                shares={u: self._bundles[u][w] for u in session.graph[w] if u in self._bundles},
            )  # fmt: skip
            for w in senders
        }

    def receive_masked(self, worker: str, result: MaskedInputResult, packed: bytes) -> None:
        """Folds one worker's masked vector into the running sum (checked whole before anything is added)."""
        self._in_session("masked_input", worker, result.round, result.session, self.survivors["shared"])
        if worker in self._masked:
            raise ProtocolViolation("a second masked input", stage="masked_input", peer=worker)
        if (result.length, result.bits) != (self.params.length, self.params.bits):
            raise ProtocolViolation("masked vector length or bits differ from the parameters", stage="masked_input", peer=worker)
        try:
            vector = bitpack.unpack(packed, self.params.bits, self.params.length)
        except ProtocolViolation as exc:
            raise ProtocolViolation(str(exc), stage="masked_input", peer=worker) from exc
        np.add(self._sum, vector, out=self._sum)
        self._masked.add(worker)

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """Closes the masked-input stage; every survivor is told the same alive and dropped lists."""
        alive = self._close("masked_input", "masked", sorted(self._masked))
        dropped = sorted(set(self.survivors["shared"]) - set(alive))
        sid = self._checked().id.hex()
        return {w: UnmaskRequest(round=self.round, session=sid, alive=alive, dropped=dropped) for w in alive}

    def receive_unmask(self, worker: str, result: UnmaskResult) -> None:
        session = self._in_session("unmask", worker, result.round, result.session, self.survivors["masked"])
        neighbours = set(session.graph[worker]) & set(self.survivors["shared"])
        alive = set(self.survivors["masked"])
        if set(result.self_mask_shares) != (neighbours & alive) | {worker} or set(result.key_shares) != neighbours - alive:
            raise ProtocolViolation("unmask shares must cover exactly the sender's neighbours", stage="unmask", peer=worker)
        self._unmask[worker] = result

    def finish(self) -> NDArray[np.uint32]:
        """Closes the unmask stage and returns the survivors' sum mod 2^bits (see :attr:`contributors`)."""
        self._close("unmask", "unmasked", sorted(self._unmask), least=self.params.threshold)
        session = self._checked()
        alive, shared = self.survivors["masked"], self.survivors["shared"]
        total = self._sum
        for owner in alive:
            seed = self._rebuild(session, owner, kind="self")
            add_mask(total, seed.to_bytes(32, "big"), bits=self.params.bits, sign=-1)
        for owner in sorted(set(shared) - set(alive)):
            private = self._rebuild(session, owner, kind="key").to_bytes(32, "big")
            if public_from_private(private) != session.keys[owner][1]:
                raise ReconstructionFailed("the rebuilt mask key does not match the advertised one", stage="unmask", peer=owner)
            for peer in session.graph[owner]:
                if peer in alive:
                    shared_secret = agree(private, session.keys[peer][1], peer=peer)
                    pair_seed = pairwise_seed(shared_secret, session=session.id, a=peer, b=owner)
                    add_mask(total, pair_seed, bits=self.params.bits, sign=-mask_sign(peer, owner))
        if self.params.bits < 32:
            np.bitwise_and(total, np.uint32((1 << self.params.bits) - 1), out=total)
        self.stage = "done"
        return total

    @property
    def contributors(self) -> list[str]:
        """The workers whose vectors are in the sum: those whose masked input arrived."""
        return list(self.survivors.get("masked", []))

    # -- helpers ------------------------------------------------------------------------------------------------
    def _rebuild(self, session: Session, owner: str, *, kind: str) -> int:
        field = "self_mask_shares" if kind == "self" else "key_shares"
        shares = [
            shamir.share_from_bytes(session.index[w], bytes.fromhex(getattr(r, field)[owner]))
            for w, r in sorted(self._unmask.items()) if owner in getattr(r, field)
        ]  # fmt: skip
        t = session.threshold
        if len(shares) < t:
            raise TooFewSurvivors(
                f"only {len(shares)} of {owner!r}'s share holders answered the unmask request, threshold {t}",
                stage="unmask", dropped=self.dropped,
            )  # fmt: skip
        secret = shamir.rebuild(shares, threshold=t)
        if len(shares) > t and shamir.rebuild(shares[-t:], threshold=t) != secret:
            raise ReconstructionFailed(f"inconsistent {kind} shares: a neighbour sent a wrong one", stage="unmask", peer=owner)
        if secret >> 256:
            raise ReconstructionFailed(f"the rebuilt {kind} secret is out of range", stage="unmask", peer=owner)
        return secret

    def _expect(self, stage: str, worker: str, round: int, allowed: Sequence[str]) -> None:
        if self.stage != stage:
            raise ProtocolViolation(f"result arrived while the round is at {self.stage!r}", stage=stage, peer=worker)
        if round != self.round or worker not in allowed:
            raise ProtocolViolation(f"not expected in round {self.round} at this stage", stage=stage, peer=worker)

    def _in_session(self, stage: str, worker: str, round: int, sid: str, allowed: Sequence[str]) -> Session:
        self._expect(stage, worker, round, allowed)
        session = self._checked()
        if sid != session.id.hex():
            raise ProtocolViolation("result for another session", stage=stage, peer=worker)
        return session

    def _close(self, stage: str, key: str, answered: list[str], *, least: int | None = None) -> list[str]:
        if self.stage != stage:
            raise ProtocolViolation(f"cannot close {stage!r}: the round is at {self.stage!r}", stage=stage)
        self.survivors[key] = answered
        least = self.params.min_survivors if least is None else least
        if len(answered) < least:
            raise TooFewSurvivors(
                f"{len(answered)} workers left after {stage}, fewer than the {least} needed",
                stage=stage, dropped=self.dropped,
            )  # fmt: skip
        following = _ORDER.index(stage) + 1
        self.stage = _ORDER[following] if following < len(_ORDER) else "finishing"
        return answered

    def _checked(self) -> Session:
        assert self._session is not None
        return self._session
