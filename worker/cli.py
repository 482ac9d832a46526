"""``fl-worker``: parse arguments, load the shard, run the daemon. Nothing else lives here."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click
import torch

from fedlink.display import PEER_ID_RULE, is_peer_id, to_peer_id
from fedlink.errors import FedlinkError
from fedlink.factory import DEFAULT_PATTERNS, ModelAllowList
from fedlink.plugins import PluginAllowList
from fedlink.protocol.auth import TOKEN_ENV, Keyring, Secret, secret_from_env, secret_from_file
from fedlink.protocol.errors import CredentialsError
from fedlink.protocol.limits import Limits, MiB
from fedlink.protocol.tls import client_context, server_context
from fedlink.shards import load_shard

from .daemon import WorkerDaemon, dial_out
from .policy import PolicyFileError, load_policy

if TYPE_CHECKING:
    from .prometheus import WorkerMetrics
from .service import WorkerService

__all__ = ["main", "serve"]

log = logging.getLogger("fedlink.worker")


def _url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("ws://", "wss://")):
        raise click.BadParameter(f"{value!r} is not a coordinator URL; expected ws://HOST:PORT or wss://HOST:PORT")
    return value


def _worker_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # The id is shown in the coordinator's logs and live table, and checked in the hello: refuse it here first.
    if value is not None and not is_peer_id(value):
        raise click.BadParameter(f"{value!r} is not a valid worker id: use {PEER_ID_RULE}")
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
@click.option("--id", "worker_id", default=None, callback=_worker_id,
              help=f"Name reported to the coordinator, {PEER_ID_RULE} [default: the shard's name, other characters as -].")
@click.option("--device", default="cpu", callback=_device, help="Torch device for training: cpu, cuda, cuda:N.")
@click.option("--allow-model", "allow", multiple=True, metavar="PATTERN",
              help=f"Also allow model factories matching this glob (repeatable). Always allowed: {', '.join(DEFAULT_PATTERNS)}.")
@click.option("--allow-plugin", "plugins", multiple=True, metavar="PATTERN",
              help="Also run training hooks and stage handlers (module:Class) matching this glob (repeatable). "
                   "None is allowed by default.")
@click.option("--slowdown", type=click.FloatRange(1.0, 1000.0), default=1.0, show_default=True,
              help="Testing heterogeneity: make every job take this many times as long as it really did.")
@click.option("--connect", "connect_url", default=None, metavar="URL", callback=_url,
              help="Dial out to a coordinator listening at URL (ws:// or wss://) instead of listening; for workers behind NAT.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Torch CPU threads for training.")
@click.option("--max-frame-mb", type=click.FloatRange(0.1, 1024), default=4.0, help="Largest WebSocket message accepted.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"File holding the secret token the coordinator must prove it knows (or set ${TOKEN_ENV}). "
                   "Without one the worker is open to anyone who can reach it.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM certificate: listen with TLS (wss://); with --connect, the client certificate for mutual TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM CA bundle: when listening, require client certificates it signed (mutual TLS); "
                   "with --connect, the CA that signed the coordinator's certificate [default: the system's].")
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=16,
              help="Most connections held at once, counted from the TCP accept; one more is refused at once.")
@click.option("--max-connections-per-address", type=click.IntRange(1, 100_000), default=8,
              help="Most connections held at once from one address.")
@click.option("--handshake-timeout", type=click.FloatRange(0.1, 600), default=10.0,
              help="Seconds a connection gets for each stage of its opening (TLS, upgrade, hello and proof).")
@click.option("--max-state-mb", type=click.FloatRange(0.001, 1 << 20), default=None,
              help="Largest model state this worker builds or receives, checked on the meta device before a model is "
                   "built for real [default: 16 GiB].")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML file of policy keys (min_batch_size, min_samples, allowed_updates, max_local_steps, "
                   "max_requests_per_hour, evaluate_models, require_secure_aggregation, require_dp, dp_modes, "
                   "max_epsilon); flags given "
                   "on the command line override it. See SECURITY.md.")
@click.option("--min-batch-size", type=click.IntRange(1), default=None,
              help="Fewest examples behind each optimizer step a request may ask for [default: 16].")
@click.option("--min-samples", type=click.IntRange(1), default=None,
              help="Fewest examples an update may be computed from [default: 16].")
@click.option("--allow-update", "allow_updates", multiple=True, type=click.Choice(["weights", "delta", "gradients"]),
              help="Update kinds this worker sends (repeatable) [default: all three].")
@click.option("--max-local-steps", type=click.IntRange(1), default=None,
              help="Most optimizer steps one request may ask for [default: no limit].")
@click.option("--max-requests-per-hour", type=click.IntRange(1), default=None,
              help="Most train, evaluate and stage requests served per hour [default: no limit].")
@click.option("--evaluate-model", "evaluate_models", multiple=True, metavar="PATTERN",
              help="Only factories matching these globs may be evaluated on the shard (repeatable) "
                   "[default: those --allow-model allows].")
@click.option("--require-secure-aggregation", is_flag=True, default=None,
              help="Refuse training rounds that do not use secure aggregation.")
@click.option("--require-dp", is_flag=True, default=None,
              help="Refuse training rounds that do not use differential privacy (of a mode --dp-mode accepts).")
@click.option("--dp-mode", "dp_modes", multiple=True, type=click.Choice(["central", "local", "distributed"]),
              help="With --require-dp, the privacy modes accepted (repeatable) [default: all three].")
@click.option("--max-epsilon", type=click.FloatRange(0, min_open=True), default=None,
              help="Local DP: refuse rounds that would take this worker's epsilon for the run above E "
                   "(its accountant lives in memory: a restarted worker starts from zero).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: any free port; logged).")
@click.option("--metrics-host", default="127.0.0.1", help="Address of the metrics endpoint.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def main(
    data: Path, port: int, host: str, worker_id: str | None, device: str, allow: tuple[str, ...],
    connect_url: str | None, threads: int | None, max_frame_mb: float, token_file: Path | None,
    tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None, max_connections: int,
    max_connections_per_address: int, handshake_timeout: float, log_level: str, metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
    plugins: tuple[str, ...] = (), slowdown: float = 1.0, max_state_mb: float | None = None,
    policy_file: Path | None = None, min_batch_size: int | None = None, min_samples: int | None = None,
    allow_updates: tuple[str, ...] = (), max_local_steps: int | None = None, max_requests_per_hour: int | None = None,
    evaluate_models: tuple[str, ...] = (), require_secure_aggregation: bool | None = None,
    require_dp: bool | None = None, dp_modes: tuple[str, ...] = (), max_epsilon: float | None = None,
) -> None:
    """Serve one private data shard to a fedlink coordinator.

    Prints one line on standard output once it is ready: ``fedlink worker listening on URL`` (or, with
    --connect, ``fedlink worker dialling URL``); logs go to standard error.
    """
    logging.basicConfig(  # force: a library may have configured logging when it was imported (opacus does)
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
        force=True,
    )
    if threads is not None:
        torch.set_num_threads(threads)
    host_given = _given(click.get_current_context(), "host")
    try:
        secret = _secret(token_file)
        server_ssl, client_ssl = _tls(tls_cert, tls_key, tls_ca, connect_url)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from exc
    _warn(secret=secret, host=host, host_given=host_given, connect_url=connect_url, tls=server_ssl is not None)
    given = {
        "min_batch_size": min_batch_size, "min_samples": min_samples, "allowed_updates": allow_updates or None,
        "max_local_steps": max_local_steps, "max_requests_per_hour": max_requests_per_hour,
        "evaluate_models": evaluate_models or None, "require_secure_aggregation": require_secure_aggregation,
        "require_dp": require_dp, "dp_modes": dp_modes or None, "max_epsilon": max_epsilon,
    }
    try:
        policy = load_policy(policy_file, {k: v for k, v in given.items() if v is not None})
    except PolicyFileError as exc:
        raise click.ClickException(str(exc)) from exc
    max_state_bytes = int(max_state_mb * MiB) if max_state_mb is not None else Limits().max_state_bytes
    try:
        shard = load_shard(data)
        service = WorkerService(
            shard, allow=ModelAllowList((*DEFAULT_PATTERNS, *allow)), device=device,
            worker_id=worker_id or to_peer_id(data.stem), plugins=PluginAllowList(plugins), slowdown=slowdown,
            policy=policy, max_state_bytes=max_state_bytes,
        )
    except FedlinkError as exc:
        raise click.ClickException(str(exc)) from exc
    log.info("policy: %s", policy.model_dump_json())
    log.info("serving %s: %d samples of shape %s (%s)", data, shard.num_samples, list(shard.sample_shape), shard.x_dtype)
    daemon = WorkerDaemon(
        service,
        limits=Limits(
            max_frame_bytes=int(max_frame_mb * MiB), max_connections_per_address=max_connections_per_address,
            max_state_bytes=max_state_bytes,
        ),
        handshake_timeout=handshake_timeout,
        keyring=Keyring(shared=secret) if secret is not None else None, ssl_context=server_ssl,
        max_connections=max_connections,
    )
    exporter = _metrics(daemon, shard.num_samples, metrics_host, metrics_port) if metrics_port is not None else None
    try:
        serve(daemon, host, port, connect_url, ssl_context=client_ssl)
    finally:
        if exporter is not None:
            exporter.close()


def _metrics(daemon: WorkerDaemon, samples: int, host: str, port: int) -> "WorkerMetrics":
    """Start the Prometheus endpoint (before the ready line, so its URL is in the log by then)."""
    from . import __version__
    from .prometheus import WorkerMetrics

    exporter = WorkerMetrics(worker_id=daemon.service.worker_id, version=__version__, samples=samples)
    try:
        url = exporter.serve(host=host, port=port)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    daemon.events = exporter
    log.info("serving metrics on %s", url)
    return exporter


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _secret(token_file: Path | None) -> Secret | None:
    """The token from --token-file or $FEDLINK_TOKEN; both at once is a mistake worth stopping for."""
    from_env = secret_from_env()
    if token_file is not None and from_env is not None:
        raise click.UsageError(f"give the token either with --token-file or in ${TOKEN_ENV}, not both")
    return secret_from_file(token_file) if token_file is not None else from_env


def _tls(
    cert: Path | None, key: Path | None, ca: Path | None, connect_url: str | None
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(listening context, dialling context) from the --tls-* flags; at most one of them is not None."""
    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if connect_url is not None:
        if connect_url.startswith("wss://"):
            return None, client_context(ca=ca, cert=cert, key=key, peer_role="coordinator")
        if cert is not None or ca is not None:
            raise click.UsageError(f"--tls-* options need a wss:// coordinator URL, not {connect_url}")
        return None, None
    if cert is None or key is None:
        if ca is not None:
            raise click.UsageError(
                "--tls-ca makes a listening worker require client certificates; it also needs the worker's own "
                "--tls-cert and --tls-key"
            )
        return None, None
    # A client certificate must be the coordinator's: another worker's certificate from the same CA is refused.
    return server_context(cert=cert, key=key, client_ca=ca, peer_role="coordinator"), None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _warn(*, secret: Secret | None, host: str, host_given: bool, connect_url: str | None, tls: bool) -> None:
    """Say loudly what an operator may not have meant: a worker anyone can use, or one others can listen in on."""
    if secret is None:
        where = connect_url if connect_url is not None else f"{host} (any process that can reach it)"
        lines = [
            "this worker is OPEN: it has no token, so it cannot tell the coordinator from anyone else.",
            f"Whoever connects ({where}) may run any allowed model on this worker's data and receive the updates.",
            f"Give it a token with --token-file PATH or ${TOKEN_ENV}, and the coordinator the same token.",
        ]
        if connect_url is None and not _is_loopback(host):
            lines.insert(1, f"It listens on {host}, which is NOT a loopback address: other machines can reach it.")
        elif connect_url is None and not host_given:
            lines.append("It listens on loopback only; pass --host explicitly to listen elsewhere.")
        banner = "!" * 100
        for line in (banner, *lines, banner):
            log.warning(line)
    if connect_url is None and not tls and not _is_loopback(host):
        log.warning(
            "listening on %s without TLS: model weights and updates cross the network unencrypted and unprotected; "
            "use --tls-cert and --tls-key", host,
        )
    if connect_url is not None and connect_url.startswith("ws://") and not _is_loopback(urlsplit(connect_url).hostname or ""):
        log.warning("dialling %s without TLS: traffic is unencrypted; use a wss:// URL", connect_url)


def serve(
    daemon: WorkerDaemon, host: str, port: int, connect_url: str | None, *, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Run ``daemon`` until SIGTERM/SIGINT: listening on host:port, or dialling ``connect_url``."""
    try:
        asyncio.run(_serve(daemon, host, port, connect_url, ssl_context))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def _serve(
    daemon: WorkerDaemon, host: str, port: int, connect_url: str | None, ssl_context: ssl.SSLContext | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if connect_url is not None:
        print(f"fedlink worker dialling {connect_url}", flush=True)
        await dial_out(daemon, connect_url, stop=stop, ssl_context=ssl_context)
        log.info("shutting down")
        return

    def ready(url: str) -> None:
        print(f"fedlink worker listening on {url}", flush=True)
        log.info("listening on %s", url)

    await daemon.run(host=host, port=port, stop=stop, on_ready=ready)


if __name__ == "__main__":  # pragma: no cover
    main()
