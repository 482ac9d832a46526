"""The capabilities a hello may list for how state travels, beside the request kinds (``train``, ``evaluate``...).

A coordinator uses a transfer feature with a worker only if the worker's hello offers it, so workers of an
earlier fedlink keep working: they get plain float32 both ways (see ``fedlink.server.transfer``).
"""

from __future__ import annotations

__all__ = ["compress", "download", "UPLOAD_TRAINABLE", "DOWNLOAD_CACHED", "TRANSFER"]


def compress(scheme: str) -> str:
    """The worker can send its update compressed with ``scheme`` (``training.compression``)."""
    return f"compress/{scheme}"


def download(dtype: str) -> str:
    """The worker takes the global state's floating-point tensors as ``dtype`` (``training.download``)."""
    return f"download/{dtype}"


#: The worker leaves frozen parameters out of its update when asked (``training.upload: trainable``).
UPLOAD_TRAINABLE = "upload/trainable"
#: The worker keeps the frozen parameters of the last global state it was sent, so the next need not send them.
DOWNLOAD_CACHED = "download/cached"

#: Everything a worker of this version offers.
TRANSFER: tuple[str, ...] = (
    *(compress(s) for s in ("float16", "bfloat16", "int8", "topk")),
    download("float16"),
    download("bfloat16"),
    UPLOAD_TRAINABLE,
    DOWNLOAD_CACHED,
)
