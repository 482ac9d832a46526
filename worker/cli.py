"""``fl-worker``: parse arguments, load the shard, run the daemon. Nothing else lives here."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click
import torch

from fedlink.errors import FedlinkError
from fedlink.factory import DEFAULT_PATTERNS, ModelAllowList
from fedlink.protocol.limits import Limits, MiB
from fedlink.shards import load_shard

from .daemon import WorkerDaemon, dial_out
from .service import WorkerService

__all__ = ["main", "serve"]

log = logging.getLogger("fedlink.worker")


def _url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("ws://", "wss://")):
        raise click.BadParameter(f"{value!r} is not a coordinator URL; expected ws://HOST:PORT or wss://HOST:PORT")
    return value


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r} asked for, but torch sees no CUDA device")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The private shard (.npy structured array with fields x and y, or .npz with arrays x and y).")
@click.option("--port", type=click.IntRange(0, 65535), default=8777, help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", help="Address to listen on; use 0.0.0.0 to accept remote coordinators.")
@click.option("--id", "worker_id", default=None, help="Name reported to the coordinator [default: the shard's name].")
@click.option("--device", default="cpu", callback=_device, help="Torch device for training: cpu, cuda, cuda:N.")
@click.option("--allow-model", "allow", multiple=True, metavar="PATTERN",
              help=f"Also allow model factories matching this glob (repeatable). Always allowed: {', '.join(DEFAULT_PATTERNS)}.")
@click.option("--connect", "connect_url", default=None, metavar="URL", callback=_url,
              help="Dial out to a coordinator listening at URL (ws:// or wss://) instead of listening; for workers behind NAT.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Torch CPU threads for training.")
@click.option("--max-frame-mb", type=click.FloatRange(0.1, 1024), default=4.0, help="Largest WebSocket message accepted.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def main(
    data: Path, port: int, host: str, worker_id: str | None, device: str, allow: tuple[str, ...],
    connect_url: str | None, threads: int | None, max_frame_mb: float, log_level: str,
) -> None:
    """Serve one private data shard to a fedlink coordinator.

    Prints one line on standard output once it is ready: ``fedlink worker listening on URL`` (or, with
    --connect, ``fedlink worker dialling URL``); logs go to standard error.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shard = load_shard(data)
        service = WorkerService(
            shard, allow=ModelAllowList((*DEFAULT_PATTERNS, *allow)), device=device,
            worker_id=worker_id or data.stem,
        )
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    log.info("serving %s: %d samples of shape %s (%s)", data, shard.num_samples, list(shard.sample_shape), shard.x_dtype)
    serve(WorkerDaemon(service, limits=Limits(max_frame_bytes=int(max_frame_mb * MiB))), host, port, connect_url)


def serve(daemon: WorkerDaemon, host: str, port: int, connect_url: str | None) -> None:
    """Run ``daemon`` until SIGTERM/SIGINT: listening on host:port, or dialling ``connect_url``."""
    try:
        asyncio.run(_serve(daemon, host, port, connect_url))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def _serve(daemon: WorkerDaemon, host: str, port: int, connect_url: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if connect_url is not None:
        print(f"fedlink worker dialling {connect_url}", flush=True)
        await dial_out(daemon, connect_url, stop=stop)
        log.info("shutting down")
        return

    def ready(url: str) -> None:
        print(f"fedlink worker listening on {url}", flush=True)
        log.info("listening on %s", url)

    await daemon.run(host=host, port=port, stop=stop, on_ready=ready)


if __name__ == "__main__":  # pragma: no cover
    main()
