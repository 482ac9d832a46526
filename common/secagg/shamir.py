"""Shamir t-of-k secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

Shamir, "How to share a secret", CACM 1979. A secret s becomes the constant term of a random polynomial f of
degree t - 1; share i is (i, f(i)). Any t shares give f(0) = s by Lagrange interpolation; any t - 1 shares are
uniformly distributed whatever s is, because each fixes one more random coefficient.

The field is prime and just larger than 2^256 so that every 32-byte value (a mask seed, an X25519 private key) is
a field element as it stands: no PEM, no byte-by-byte GF(2^8) loops. Shares are (index, 33-byte value). Rebuilding
computes the Lagrange coefficients at 0 with a single modular inversion (Montgomery's batch trick), so a key costs
a few hundred big-integer multiplications at k = 51. ``prime`` is a parameter so that tests can check the
uniformity of t - 1 shares on a tiny field; production code uses :data:`PRIME`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from .errors import ShareError

__all__ = ["PRIME", "SHARE_BYTES", "Share", "split", "rebuild", "share_to_bytes", "share_from_bytes"]

#: The smallest prime above 2^256.
PRIME = 2**256 + 297
#: Bytes of one share value (a field element, big-endian).
SHARE_BYTES = 33

Share = tuple[int, int]


def split(secret: int, *, threshold: int, indices: Sequence[int], prime: int = PRIME) -> list[Share]:
    """Shares of ``secret`` for the holders at ``indices`` (distinct, in 1..prime-1); any ``threshold`` rebuild it."""
    _check_indices(indices, prime)
    if not 1 <= threshold <= len(indices):
        raise ShareError(f"threshold must be between 1 and the {len(indices)} holders, got {threshold}")
    if not 0 <= secret < prime:
        raise ShareError(f"the secret must be a field element in [0, {prime}), got a value of {secret.bit_length()} bits")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    shares = []
    for index in indices:
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * index + coefficient) % prime
        shares.append((index, value))
    return shares


def rebuild(shares: Sequence[Share], *, threshold: int, prime: int = PRIME) -> int:
    """The secret behind ``shares``: interpolated at 0 from the first ``threshold`` of them.

    Refuses fewer than ``threshold`` shares, and duplicate or zero indices (a duplicate would make the Lagrange
    denominators vanish; index 0 would be the secret itself).
    """
    if threshold < 1:
        raise ShareError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}")
    _check_indices([index for index, _ in shares], prime)
    used = shares[:threshold]
    xs = [index for index, _ in used]
    # L_i(0) = prod_{j != i} x_j / (x_j - x_i); numerators from the product of all x, denominators inverted together.
    denominators = []
    for i, xi in enumerate(xs):
        d = xi
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xj - xi) % prime
        denominators.append(d)
    inverses = _batch_inverse(denominators, prime)
    total = 1
    for x in xs:
        total = total * x % prime
    secret = 0
    for (_, y), inverse in zip(used, inverses):
        secret = (secret + y * total % prime * inverse) % prime
    return secret


def share_to_bytes(share: Share) -> bytes:
    """The share's value as :data:`SHARE_BYTES` big-endian bytes (the index travels beside it)."""
    return share[1].to_bytes(SHARE_BYTES, "big")


def share_from_bytes(index: int, data: bytes, *, prime: int = PRIME) -> Share:
    if len(data) != SHARE_BYTES:
        raise ShareError(f"a share value is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= prime:
        raise ShareError("a share value lies outside the field")
    return (index, value)


def _check_indices(indices: Sequence[int], prime: int) -> None:
    seen: set[int] = set()
    for index in indices:
        if not 0 < index < prime:
            raise ShareError(f"share indices must lie in 1..{prime - 1}, got {index}")
        if index in seen:
            raise ShareError(f"share index {index} appears twice")
        seen.add(index)


def _batch_inverse(values: Sequence[int], prime: int) -> list[int]:
    # Montgomery: one modular exponentiation for all inverses, three multiplications per value.
    prefix = [1]
    for value in values:
        prefix.append(prefix[-1] * value % prime)
    inverse = pow(prefix[-1], prime - 2, prime)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inverse % prime
        inverse = inverse * values[i] % prime
    return out
