"""Hard limits on what a peer may send; every receive path checks against one :class:`Limits`.

Model states travel as many small frames (see :mod:`fedlink.protocol.tensors`), so the per-frame limit can stay
small even for multi-gigabyte models, while the per-state limits bound what a peer can make us allocate.
``max_connections_per_address`` bounds what one address can make a listener hold (see :mod:`.transport`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Limits", "MiB", "GiB"]

MiB = 1 << 20
GiB = 1 << 30


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_bytes: int = Field(1 * MiB, ge=4096, le=64 * MiB, description="size of the data frames we send")
    max_frame_bytes: int = Field(
        4 * MiB + 4096, ge=64 * 1024, description="largest single WebSocket message we accept"
    )
    max_state_bytes: int = Field(16 * GiB, ge=1, description="largest model state we accept")
    max_tensors: int = Field(100_000, ge=1, description="most tensors in one model state")
    max_tensor_elements: int = Field(1 << 34, ge=1, description="most elements in one tensor")
    max_name_chars: int = Field(1024, ge=1)
    max_dims: int = Field(16, ge=1)
    max_connections_per_address: int | None = Field(
        None, ge=1, description="most connections a listener holds from one address (None: only max_connections)"
    )
    concurrent_uploads: int = Field(
        4, ge=1, le=1024,
        description="coordinator: most worker updates being received or waiting for their turn in the fold at once",
    )
    upload_buffer_bytes: int = Field(
        512 * MiB, ge=1,
        description="coordinator: updates held in memory while received or waiting hold at most this many bytes "
        "together (always room for one); spilled updates (spill_bytes) do not count, they wait on disk",
    )
    spill_bytes: int = Field(
        16 * MiB, ge=0,
        description="coordinator: an uncompressed update at least this large is received into an unnamed temporary "
        "file as it arrives, then checked and folded a slice at a time, so memory stays near 2x the model",
    )
    spill_dir: str | None = Field(
        None, description="coordinator: where spilled updates are written (None: the system's temporary directory)"
    )
    max_update_norm: float = Field(
        1e9, gt=0, allow_inf_nan=False,
        description="coordinator: an update whose floating-point tensors have a larger L2 norm is refused "
        "(weights, delta or gradients as sent); 1e9 is far above any honest model and far below float32's 3.4e38",
    )
