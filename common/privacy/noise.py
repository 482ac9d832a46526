"""Noise for differential privacy from a keyed cryptographic stream: unpredictable, yet repeatable on resume.

A seed in the config (or any generator whose state follows from its outputs) would let whoever reads the config or
the released models subtract the noise. Instead a :class:`NoiseSource` holds a 32-byte secret from :mod:`secrets`,
made when a run starts and kept only in the run's checkpoint. Each draw is labelled ``(round, purpose, tensor
name)``; the label and the secret give a ChaCha20 key (HMAC-SHA256, from ``cryptography``), and the ChaCha20
keystream gives the uniforms. The same secret and label give the same noise bit for bit, so a resumed run repeats
an uninterrupted one; without the secret the noise is as unpredictable as ChaCha20's output.

Continuous Gaussian: Box-Muller (Box and Muller, 1958) on uniforms with 53 random bits, in float64, cast to the
tensor's dtype at the end. Floating-point sampling is not exactly Gaussian (Mironov, CCS 2012, showed the effect
for the Laplace mechanism); the deviation is at the level of float64 rounding, and the tails are cut at about
8.6 standard deviations (the smallest uniform is 2**-54).

Discrete Gaussian (for distributed DP on quantised integer updates): Canonne, Kamath, Steinke, "The Discrete
Gaussian for Differential Privacy", NeurIPS 2020, Algorithm 3: a discrete Laplace proposal with scale
``t = floor(sigma) + 1``, drawn as the difference of two geometric variables, accepted with probability
``exp(-(|y| - sigma**2 / t)**2 / (2 sigma**2))``. The paper's exact rational-arithmetic Bernoulli samplers are
replaced by comparisons of 53-bit uniforms with float64 probabilities, which vectorises the sampler (millions of
values per second); every probability the sampler uses is thus exact to float64 rounding (relative error below
2**-52), not exact in the paper's strict sense.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .errors import PrivacyError

__all__ = ["NoiseSource", "SECRET_BYTES"]

SECRET_BYTES = 32
_DOMAIN = b"fedlink/privacy/noise/v1"
_CHUNK = 1 << 20  # values generated per block: bounds the scratch memory to tens of MiB whatever the tensor size


class _Keystream:
    """ChaCha20's keystream under one derived key, read as 64-bit words."""

    _ZEROS = bytes(8 * _CHUNK)

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def uniforms(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms in (0, 1) with 53 random bits each, never 0 or 1."""
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            words = np.frombuffer(self._encryptor.update(self._ZEROS[: 8 * n]), dtype="<u8")
            out[start : start + n] = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        return out


class NoiseSource:
    """Labelled Gaussian and discrete Gaussian draws keyed by a run secret; see the module docstring.

    Make one with :meth:`create` at the start of a run, store :meth:`state_dict` in the checkpoint only, and
    rebuild it with :meth:`from_state_dict` on resume. Never log it or put it in metrics or a model file.
    """

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise PrivacyError(f"a noise secret is {SECRET_BYTES} bytes")
        self._secret = secret

    @classmethod
    def create(cls) -> NoiseSource:
        """A new source with a fresh secret from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    def __repr__(self) -> str:
        return "NoiseSource(<secret>)"

    def state_dict(self) -> dict[str, str]:
        """The secret, hex-encoded, for the checkpoint and nowhere else."""
        return {"secret": self._secret.hex()}

    @classmethod
    def from_state_dict(cls, state: dict[str, str]) -> NoiseSource:
        try:
            secret = bytes.fromhex(state["secret"])
        except (KeyError, TypeError, ValueError):
            raise PrivacyError("checkpointed noise secret is missing or not hex; the run cannot resume its noise") from None
        return cls(secret)

    def _stream(self, server_round: int, purpose: str, name: str) -> _Keystream:
        if server_round < 0:
            raise PrivacyError(f"round must be >= 0, got {server_round}")
        mac = hmac.HMAC(self._secret, hashes.SHA256())
        mac.update(_DOMAIN)
        mac.update(struct.pack("<Q", server_round))
        for part in (purpose, name):
            data = part.encode()
            mac.update(struct.pack("<I", len(data)) + data)
        return _Keystream(mac.finalize())

    def uniforms(self, server_round: int, purpose: str, name: str, count: int) -> np.ndarray:
        """``count`` uniforms in (0, 1) for this label (float64 with 53 random bits)."""
        return self._stream(server_round, purpose, name).uniforms(count)

    def gaussian(
        self,
        server_round: int,
        purpose: str,
        name: str,
        shape: Sequence[int],
        std: float,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A tensor of independent N(0, std**2) values for this label, in ``dtype`` on the CPU."""
        if not (std >= 0 and math.isfinite(std)):
            raise PrivacyError(f"noise std must be finite and >= 0, got {std}")
        count = math.prod(shape)
        stream = self._stream(server_round, purpose, name)
        work = np.float64 if dtype == torch.float64 else np.float32
        out = np.empty(count, dtype=work)
        half = _CHUNK // 2
        for start in range(0, count, 2 * half):
            n = min(2 * half, count - start)
            pairs = (n + 1) // 2
            u = stream.uniforms(2 * pairs)
            radius = np.sqrt(-2.0 * np.log(u[:pairs])) * std
            angle = (2.0 * math.pi) * u[pairs:]
            block = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))
            out[start : start + n] = block[:n]
        return torch.from_numpy(out).to(dtype).reshape(tuple(shape))

    def discrete_gaussian(
        self, server_round: int, purpose: str, name: str, shape: Sequence[int], sigma: float
    ) -> torch.Tensor:
        """An int64 tensor of independent discrete Gaussian values with parameter ``sigma`` (P(x) ~ exp(-x²/2σ²))."""
        if not (sigma > 0 and math.isfinite(sigma)):
            raise PrivacyError(f"discrete Gaussian sigma must be positive and finite, got {sigma}")
        count = math.prod(shape)
        stream = self._stream(server_round, purpose, name)
        t = math.floor(sigma) + 1
        log_p = -1.0 / t  # geometric with P(G = k) = (1 - p) p**k, p = exp(-1/t)
        shift = sigma * sigma / t
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            n = min(_CHUNK, max(64, 2 * (count - filled)))  # acceptance is above 1/2 for every sigma (CKS 2020)
            u = stream.uniforms(3 * n)
            g1 = np.floor(np.log(u[:n]) / log_p)
            g2 = np.floor(np.log(u[n : 2 * n]) / log_p)
            y = g1 - g2
            accept = u[2 * n :] < np.exp(-((np.abs(y) - shift) ** 2) / (2 * sigma * sigma))
            kept = y[accept].astype(np.int64)[: count - filled]
            out[filled : filled + kept.size] = kept
            filled += kept.size
        return torch.from_numpy(out).reshape(tuple(shape))
