"""Parameters of a secure round: neighbours k, Shamir threshold t, survivors, and how they are chosen.

Notation: n workers selected, c = ``colluding`` workers that may pool what they know with a curious or lying
coordinator, k = neighbours per worker, t = threshold (shares needed to rebuild a worker's secret).

* Secrecy. A worker's two secrets (self-mask seed and mask key) are shared among itself and its k neighbours
  (Bonawitz et al., CCS 2017, section 4: shares go to every holder, the owner included). A coordinator may lie
  about who dropped, telling some neighbours "u dropped" and others "u survived"; each honest holder reveals
  only one kind of share for u (section 6), and u itself never reveals a share of its own mask key. Colluders
  give both kinds, u's own self-mask share is one more, so the coordinator gets both secrets only if
  2 (t - c) - 1 <= k - c. Hence ``t = floor((k + c + 1) / 2) + 1`` is the smallest safe threshold, with c counted
  among the neighbours (at most min(c, k); for sparse graphs the count exceeded only with probability 2^-40 / n
  under the random graph).
* Recovery. A dropped worker's mask key is rebuilt from its surviving neighbours, so at most k - t of any
  worker's neighbours may drop.
* Neighbours. Up to 50 workers, every other worker (k = n - 1, the original SecAgg). Above, the smallest even k
  such that (Bell et al., CCS 2020, appendix; the same bounds as Google's SecAgg+ parameter finder): the honest
  survivors stay connected on the Harary ring except with probability 2^-40 (every cut needs k/2 consecutive bad
  workers in two places: union bound over n (n - k - 1) / 2 gap pairs), and the threshold above leaves recovery
  failing with probability under 2^-20 when at most n - ``min_survivors`` workers drop (hypergeometric tails).
* ``min_survivors`` (default: max(t, c + 2), or ceil(2n/3) for sparse graphs) is the fewest workers whose sum is
  released: a sum over c + 1 workers would hand c colluders the last worker's update.
"""

from __future__ import annotations

import json
import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import SecAggConfigError

__all__ = ["FULL_GRAPH_LIMIT", "SecAggParams", "resolve_params", "secure_threshold", "sparse_degree", "check"]

FULL_GRAPH_LIMIT = 50
_SECURITY = 40  # statistical security: bad events below 2^-40
_CORRECTNESS = 20  # recovery fails with probability below 2^-20


class SecAggParams(BaseModel):
    """Resolved parameters of one secure round; part of the session id, so every worker checks the same values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_selected: int = Field(ge=3)
    neighbours: int = Field(ge=2)
    threshold: int = Field(ge=2)
    colluding: int = Field(ge=0)
    min_survivors: int = Field(ge=2)
    bits: int = Field(ge=2, le=32)
    length: int = Field(ge=1, description="values in the masked vector (update coordinates and extras)")

    @model_validator(mode="after")
    def _consistent(self) -> SecAggParams:
        check(self)
        return self

    def canonical(self) -> bytes:
        """The bytes the session id hashes: sorted-key JSON."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()


def secure_threshold(k: int, colluding_neighbours: int) -> int:
    """The smallest t with 2 (t - c) - 1 > k - c: a lying coordinator cannot gather both kinds of share."""
    return (k + colluding_neighbours + 1) // 2 + 1


def check(p: SecAggParams) -> None:
    n, k, t, c = p.num_selected, p.neighbours, p.threshold, p.colluding
    if k > n - 1:
        raise SecAggConfigError(f"neighbours must be at most n - 1 = {n - 1}, got {k}")
    if k < n - 1 and k % 2:
        raise SecAggConfigError(f"neighbours below n - 1 must be even (k/2 on each side of the ring), got {k}")
    if c > n - 2:
        raise SecAggConfigError(f"colluding must leave at least two honest workers among {n}, got {c}")
    # sparse graphs: the colluding neighbours are a tail bound, so only the c = 0 floor is checked here
    least = secure_threshold(k, min(c, k) if k == n - 1 else 0)
    if not least <= t <= k:
        raise SecAggConfigError(
            f"threshold must lie in [{least}, {k}] for k = {k} neighbours and {c} colluding workers, got {t}"
        )
    if not max(t, c + 2) <= p.min_survivors <= n:
        raise SecAggConfigError(f"min_survivors must lie in [{max(t, c + 2)}, {n}], got {p.min_survivors}")


def resolve_params(
    *,
    num_selected: int,
    length: int,
    bits: int = 32,
    neighbours: int | None = None,
    threshold: int | None = None,
    colluding: int = 0,
    min_survivors: int | None = None,
) -> SecAggParams:
    """Fill in the defaults (see the module docstring) and check the result; errors name the value and its range."""
    n = num_selected
    if n < 3:
        raise SecAggConfigError(f"secure aggregation needs at least 3 selected workers, got {n}")
    if neighbours is None:
        if n <= FULL_GRAPH_LIMIT:
            neighbours = n - 1
        else:
            survivors = min_survivors if min_survivors is not None else math.ceil(2 * n / 3)
            neighbours, sparse_t = sparse_degree(n, colluding=colluding, dropouts=n - survivors)
            threshold = sparse_t if threshold is None else threshold
    k = neighbours
    if threshold is None:
        threshold = secure_threshold(k, min(colluding, k))
    if min_survivors is None:
        min_survivors = max(threshold, colluding + 2) if k == n - 1 else max(math.ceil(2 * n / 3), threshold)
    try:
        return SecAggParams(
            num_selected=n, neighbours=k, threshold=threshold, colluding=colluding,
            min_survivors=min_survivors, bits=bits, length=length,
        )  # fmt: skip
    except ValueError as exc:  # pydantic wraps our own error; surface it with its message
        cause = exc.__cause__ if isinstance(exc.__cause__, SecAggConfigError) else None
        raise SecAggConfigError(str(cause or exc)) from exc


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1) if 0 <= b <= a else -math.inf


def _hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P(X >= at_least) for X ~ Hypergeometric(population, marked, draws)."""
    total = _log_comb(population, draws)
    upper = min(marked, draws)
    return sum(
        math.exp(_log_comb(marked, x) + _log_comb(population - marked, draws - x) - total)
        for x in range(max(at_least, 0), upper + 1)
    )


def sparse_degree(n: int, *, colluding: int, dropouts: int) -> tuple[int, int]:
    """The smallest even k (and its threshold) meeting the secrecy and recovery bounds of the module docstring."""
    bad = colluding + dropouts
    for k in range(2, n - 1, 2):
        if k <= bad:
            # P(k given workers all bad) = bad! (n-k)! / (n! (bad-k)!), times the number of gap pairs
            log_p = math.log(n) + math.log(max(n - k - 1, 1)) - math.log(2)
            log_p += math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1) - math.lgamma(bad - k + 1)
            if log_p >= -(_SECURITY + 1) * math.log(2):
                continue
        # colluding neighbours: the smallest c_k exceeded with probability <= 2^-41 / n
        c_k = next(x for x in range(k + 1) if _hypergeometric_tail(n - 1, colluding, k, x + 1) <= 2 ** -(_SECURITY + 1) / n)
        t = max(secure_threshold(k, c_k), 2)
        # recovery: more than k - t dropped neighbours with probability <= 2^-20 / n
        if t <= k and _hypergeometric_tail(n - 1, dropouts, k, k - t + 1) <= 2.0**-_CORRECTNESS / n:
            return k, t
    raise SecAggConfigError(
        f"no neighbour count keeps {n} workers private with {colluding} colluding and {dropouts} dropping; "
        "raise min_survivors or lower colluding"
    )
