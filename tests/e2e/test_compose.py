"""The compose demo without Docker: docker-compose.yml, the Dockerfile, the CLIs and docker/coordinator.yaml agree,
and the compose services' own commands, run as local processes on loopback, train a model.

What is checked statically: every worker URL of the coordinator's config is a ``wss://`` URL naming an
``fl-worker`` service that listens on that port on all interfaces; every path a command reads lies in a volume
mounted into its service, and was written there by the ``data`` service (shards) or the ``certs`` service
(certificates, keys and tokens); each worker mounts only its own shard and its own credentials, requires a token and
client certificates, and its certificate names the host the coordinator dials; the coordinator holds each worker's
token and a client certificate, and no service but ``certs`` sees the CA's key; every command parses with the real
click CLI (or the script's argparse parser); the image has a writable folder under every volume.
The last test then runs those same commands: only the listening address, the ports and the volume paths differ, and
the certificates also name 127.0.0.1 (the address the coordinator dials here).
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from fedlink.server.cli import main as coordinator_cli
from fedlink.server.config import load_config
from fedlink.server.localworkers import LocalWorker, Spawned, spawn_worker, wait_ready
from fedlink.worker.cli import main as worker_cli

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MAKE_SHARDS = REPO / "docker" / "make_shards.py"

pytestmark = pytest.mark.timeout(120)


# --- reading the compose file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str  # a named volume, or a host path relative to the compose file
    target: PurePosixPath
    read_only: bool

    @property
    def is_volume(self) -> bool:
        return not self.source.startswith((".", "/", "~"))

    def host_path(self, volumes: dict[str, Path]) -> Path:
        return volumes[self.source] if self.is_volume else (COMPOSE_FILE.parent / self.source).resolve()


def _parse_mount(entry: str | dict[str, Any]) -> Mount:
    if isinstance(entry, dict):  # the long syntax
        return Mount(str(entry["source"]), PurePosixPath(entry["target"]), bool(entry.get("read_only", False)))
    source, target, *mode = entry.split(":")
    return Mount(source, PurePosixPath(target), "ro" in (mode[0].split(",") if mode else []))


@dataclass(frozen=True)
class Service:
    name: str
    spec: dict[str, Any]

    @property
    def command(self) -> list[str]:
        command = self.spec["command"]
        assert isinstance(command, list), f"{self.name}: write the command as a list, so no shell reparses it"
        return [str(part) for part in command]

    @property
    def mounts(self) -> list[Mount]:
        return [_parse_mount(entry) for entry in self.spec.get("volumes", [])]

    def mount_of(self, path: str | PurePosixPath) -> Mount:
        """The mount that holds the container path ``path`` (the deepest, as Docker resolves it)."""
        path = PurePosixPath(path)
        assert path.is_absolute(), f"{self.name}: {path} is relative; a container path must not depend on the workdir"
        holding = [m for m in self.mounts if path == m.target or m.target in path.parents]
        assert holding, f"{self.name}: {path} lies in no volume mounted into the service ({self.mounts})"
        return max(holding, key=lambda m: len(m.target.parts))

    def host_path(self, path: str | PurePosixPath, volumes: dict[str, Path]) -> Path:
        """Where the container path ``path`` of this service lies on this machine, volumes mapped to ``volumes``."""
        mount = self.mount_of(path)
        return mount.host_path(volumes).joinpath(*PurePosixPath(path).relative_to(mount.target).parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


FEDLINK_IMAGE = "fedlink-demo:latest"


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    """The services that run fedlink's image; Prometheus and Grafana are checked in test_monitoring_compose.py."""
    return {name: Service(name, spec) for name, spec in compose["services"].items() if spec.get("image") == FEDLINK_IMAGE}


@pytest.fixture(scope="module")
def workers(services: dict[str, Service]) -> dict[str, Service]:
    found = {name: s for name, s in services.items() if s.command[0] == "fl-worker"}
    assert found, "no service runs fl-worker"
    return found


@pytest.fixture(scope="module")
def coordinator(services: dict[str, Service]) -> Service:
    found = [s for s in services.values() if s.command[:2] == ["fl-coordinator", "train"]]
    assert len(found) == 1, "exactly one service runs fl-coordinator train"
    return found[0]


@pytest.fixture(scope="module")
def data_service(services: dict[str, Service]) -> Service:
    return services["data"]


@pytest.fixture(scope="module")
def certs_service(services: dict[str, Service]) -> Service:
    found = [s for s in services.values() if s.command[:2] == ["fl-coordinator", "certs"]]
    assert len(found) == 1, "exactly one service runs fl-coordinator certs"
    return found[0]


def _option(args: Sequence[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must appear exactly once in {list(args)}"
    return args[args.index(name) + 1]


def _without_options(args: Sequence[str], names: set[str]) -> list[str]:
    """``args`` minus each option in ``names`` and its value (all of them take one)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        else:
            kept.append(arg)
    return kept


def _config_path(coordinator: Service) -> str:
    return str(coordinator_params(coordinator.command)["config_path"])


def _config_source(coordinator: Service) -> Path:
    mount = coordinator.mount_of(_config_path(coordinator))
    assert not mount.is_volume and mount.read_only, f"mount the config read-only from the repository, not {mount}"
    assert mount.target == PurePosixPath(_config_path(coordinator)), "mount the config file itself, not its folder"
    return mount.host_path({})


def _load_make_shards() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedlink_make_shards", MAKE_SHARDS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- parsing commands with the real CLIs, without running them ---------------------------------------------------


def worker_params(command: Sequence[str]) -> dict[str, Any]:
    assert command[0] == "fl-worker"
    with worker_cli.make_context("fl-worker", list(command[1:])) as ctx:
        return dict(ctx.params)


def coordinator_params(command: Sequence[str], expected: str = "train") -> dict[str, Any]:
    assert command[0] == "fl-coordinator"
    with coordinator_cli.make_context("fl-coordinator", list(command[1:])) as ctx:
        with warnings.catch_warnings():  # click 8.2 to 8.x keep the subcommand in protected_args; 9 in args
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*getattr(ctx, "protected_args", ()), *ctx.args]
        name, sub, sub_args = coordinator_cli.resolve_command(ctx, rest)
        assert sub is not None and name == expected, f"expected `fl-coordinator {expected}`, not {name!r}"
        with sub.make_context(name, sub_args, parent=ctx) as sub_ctx:
            return dict(sub_ctx.params)


def certs_params(command: Sequence[str]) -> dict[str, Any]:
    return coordinator_params(command, "certs")


def test_every_command_parses_with_the_real_cli(services: dict[str, Service]) -> None:
    parser = _load_make_shards().build_parser()
    for service in services.values():
        program, *args = service.command
        try:
            if program == "fl-worker":
                worker_params(service.command)
            elif program == "fl-coordinator":
                coordinator_params(service.command, service.command[1])
            elif args[:1] == ["docker/make_shards.py"]:
                assert program == "python"
                parser.parse_args(args[1:])
            else:
                pytest.fail(f"{service.name}: unexpected command {service.command}")
        except click.ClickException as exc:
            pytest.fail(f"{service.name}: {service.command} is refused: {exc.format_message()}")
        except SystemExit:
            pytest.fail(f"{service.name}: {service.command} is refused by make_shards.py (see stderr)")


def test_a_bad_command_is_caught() -> None:
    """The checks above would notice a misspelt option."""
    with pytest.raises(click.NoSuchOption):
        worker_params(["fl-worker", "--data", "/data/shard.npy", "--hots", "0.0.0.0"])
    with pytest.raises(click.BadParameter):
        coordinator_params(["fl-coordinator", "train", "/config/config.yaml", "--log-level", "loud"])


# --- the compose file, the image and the coordinator's config agree ----------------------------------------------


def test_one_image_for_every_service(compose: dict[str, Any], services: dict[str, Service]) -> None:
    others = {name: spec.get("image") for name, spec in compose["services"].items() if name not in services}
    assert set(others) == {"prometheus", "grafana"}, f"only the monitoring services run another image: {others}"
    assert all(re.fullmatch(r"(prom/prometheus|grafana/grafana):v?\d+\.\d+\.\d+", str(i)) for i in others.values()), (
        f"monitoring images are pinned to a release: {others}"
    )
    builds = {str(s.spec.get("build")) for s in services.values() if "build" in s.spec}
    assert builds == {"."}, "the image is built from the repository's Dockerfile"


def test_worker_urls_name_listening_worker_services(coordinator: Service, workers: dict[str, Service]) -> None:
    config = load_config(_config_source(coordinator))
    configured = {}
    for entry in config.workers:
        url = urlsplit(entry.url)
        assert url.scheme == "wss" and url.hostname and url.port, f"{entry.url}: expected wss://SERVICE:PORT"
        assert url.hostname in workers, f"{entry.url}: no fl-worker service is called {url.hostname!r}"
        params = worker_params(workers[url.hostname].command)
        assert params["host"] == "0.0.0.0", f"{url.hostname} must listen on all interfaces to be reachable"
        assert params["port"] == url.port, f"{entry.url}: the service listens on port {params['port']}"
        configured[url.hostname] = params
    assert configured.keys() == workers.keys(), "every worker service is in the coordinator's config"
    ids = [params["worker_id"] for params in configured.values()]
    assert len(set(ids)) == len(ids), f"worker ids repeat: {ids}"


def test_worker_healthchecks_probe_the_listening_port(workers: dict[str, Service]) -> None:
    for name, service in workers.items():
        test = service.spec["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: the healthcheck runs python, which the image has"
        probed = re.search(r"\(\s*'127\.0\.0\.1'\s*,\s*(\d+)\s*\)", test[3])
        assert probed, f"{name}: the healthcheck opens no TCP connection to 127.0.0.1"
        assert int(probed.group(1)) == worker_params(service.command)["port"]
        compile(test[3], f"{name} healthcheck", "exec")


def test_coordinator_waits_for_healthy_workers(coordinator: Service, workers: dict[str, Service]) -> None:
    depends = coordinator.spec["depends_on"]
    for name in workers:
        assert depends[name]["condition"] == "service_healthy", (
            f"the coordinator must not start before {name} accepts connections (its healthcheck passes)"
        )


def _credential_paths(params: dict[str, Any]) -> list[str]:
    return [str(params[key]) for key in ("token_file", "tls_cert", "tls_key", "tls_ca")]


def test_each_worker_mounts_only_its_own_shard_and_credentials(
    workers: dict[str, Service], coordinator: Service, services: dict[str, Service]
) -> None:
    owners: dict[str, str] = {}
    for name, service in workers.items():
        params = worker_params(service.command)
        data = service.mount_of(str(params["data"]))
        secrets = {service.mount_of(path) for path in _credential_paths(params)}
        assert len(secrets) == 1, f"{name} reads its credentials from one volume, not {secrets}"
        assert sorted(service.mounts, key=str) == sorted([data, *secrets], key=str), (
            f"{name} mounts {service.mounts}; it needs only its shard's and its credentials' volumes"
        )
        for mount in (data, *secrets):
            assert mount.is_volume and mount.read_only, f"{name}: mount {mount.target} as a read-only named volume"
            assert mount.source not in owners, f"{name} and {owners.get(mount.source)} share volume {mount.source}"
            owners[mount.source] = name
    shared = {m.source for m in coordinator.mounts} & owners.keys()
    assert not shared, f"the coordinator mounts workers' shards or credentials: {shared}"


def test_workers_require_tokens_and_client_certificates(workers: dict[str, Service]) -> None:
    for name, service in workers.items():
        params = worker_params(service.command)
        for key in ("token_file", "tls_cert", "tls_key", "tls_ca"):
            assert params[key] is not None, f"{name}: no --{key.replace('_', '-')}; the demo must not run open workers"


def test_certs_service_writes_every_credential_that_is_read(
    certs_service: Service, workers: dict[str, Service], coordinator: Service, services: dict[str, Service]
) -> None:
    params = certs_params(certs_service.command)
    out = PurePosixPath(params["out"])
    assert params["tokens"], "the certs service writes the tokens too"
    hosts = {machine.folder: machine for machine in params["hosts"]}

    def written(*parts: str) -> tuple[str, PurePosixPath]:
        mount = certs_service.mount_of(out.joinpath(*parts))
        assert mount.is_volume and not mount.read_only and mount.target == out / parts[0], (
            f"certs writes {out.joinpath(*parts)} outside a volume of its own folder"
        )
        return mount.source, out.joinpath(*parts).relative_to(mount.target)

    def read(service: Service, path: str | Path) -> tuple[str, PurePosixPath]:
        mount = service.mount_of(str(path))
        return mount.source, PurePosixPath(str(path)).relative_to(mount.target)

    config = load_config(_config_source(coordinator))
    urls = {urlsplit(entry.url).hostname: entry for entry in config.workers}
    for name, service in workers.items():
        worker = worker_params(service.command)
        host = hosts.get(name)
        assert host is not None, f"certs issues no certificate for {name}, the host the coordinator dials"
        assert name in host.names and name in urls
        for key, file in (("tls_cert", "cert.pem"), ("tls_key", "key.pem"), ("tls_ca", "ca.pem"), ("token_file", "token")):
            assert read(service, worker[key]) == written(host.folder, file), f"{name} --{key} is not certs' {file}"
        entry = urls[name]
        assert entry.token_file is not None, f"the coordinator has no token for {name}"
        assert read(coordinator, entry.token_file) == written("coordinator", "tokens", f"{host.folder}.token")
        assert service.spec["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert config.tls is not None and config.tls.cert is not None and config.tls.key is not None
    assert config.tls.ca is not None
    for path, file in ((config.tls.ca, "ca.pem"), (config.tls.cert, "cert.pem"), (config.tls.key, "key.pem")):
        assert read(coordinator, path) == written("coordinator", file)
    ca_volume = written("ca", "ca.key")[0]
    holders = [s.name for s in services.values() if any(m.source == ca_volume for m in s.mounts)]
    assert holders == [certs_service.name], f"only the certs service may see the CA's key, not {holders}"


def test_data_service_writes_every_file_that_is_read(
    data_service: Service, workers: dict[str, Service], coordinator: Service
) -> None:
    args = _load_make_shards().build_parser().parse_args(data_service.command[2:])
    written = {}
    for path in [*args.shards, args.test]:
        mount = data_service.mount_of(path.as_posix())
        assert mount.is_volume and not mount.read_only
        written[(mount.source, PurePosixPath(path).relative_to(mount.target))] = path
    assert len(args.shards) == len(workers), "one shard per worker service"

    def written_by_data(service: Service, path: str) -> bool:
        mount = service.mount_of(path)
        return (mount.source, PurePosixPath(path).relative_to(mount.target)) in written

    for name, service in workers.items():
        assert written_by_data(service, str(worker_params(service.command)["data"])), f"{name} reads a file data never writes"
        assert service.spec["depends_on"]["data"]["condition"] == "service_completed_successfully"
    config = load_config(_config_source(coordinator))
    assert config.evaluation.data is not None
    assert written_by_data(coordinator, config.evaluation.data.as_posix()), "the coordinator's test set is never written"


def test_coordinator_config_is_mounted_and_its_paths_are_in_volumes(coordinator: Service) -> None:
    source = _config_source(coordinator)
    assert source == REPO / "docker" / "coordinator.yaml"
    config = load_config(source)  # validates, and resolves relative paths against the config's folder
    assert config.evaluation.data is not None and config.evaluation.data.is_absolute()
    assert coordinator.mount_of(config.evaluation.data.as_posix()).is_volume
    output = coordinator.mount_of(config.output.as_posix())
    assert output.is_volume and not output.read_only, "the results go to a writable named volume"
    assert output.target != config.output, "output is a folder inside the volume, not the mount point itself"


def test_image_has_a_writable_folder_under_every_volume(services: dict[str, Service]) -> None:
    """A new named volume takes the owner of the image folder it is mounted on: root's, if the folder is missing."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image runs as an unprivileged user"
    torch = text.index("--index-url https://download.pytorch.org/whl/cpu torch")
    project = text.index("pip install /tmp/fedlink")
    assert torch < project, "torch's CPU build is installed before the project, so pip keeps it"
    created = {PurePosixPath(p) for line in re.findall(r"mkdir -p ([^\n&\\]+)", text) for p in line.split()}
    owned = {PurePosixPath(p) for line in re.findall(r"chown \S+ ([^\n&\\]+)", text) for p in line.split()}
    for service in services.values():
        for mount in service.mounts:
            if mount.is_volume:
                assert mount.target in created & owned, f"{service.name}: the image lacks a user-owned {mount.target}"


def test_image_holds_the_data_script_where_the_data_service_runs_it(data_service: Service) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    script = PurePosixPath(workdir) / data_service.command[1]
    assert re.search(rf"^COPY\s+docker/make_shards\.py\s+{re.escape(str(script))}\s*$", text, re.M)
    ignore = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert "!docker/make_shards.py" in ignore, ".dockerignore must let the script into the build context"


# --- the same commands, run on loopback --------------------------------------------------------------------------


def _host_command(command: Sequence[str], service: Service, volumes: dict[str, Path]) -> list[str]:
    """``command`` with every absolute container path replaced by where its volume lies here."""
    return [str(service.host_path(arg, volumes)) if arg.startswith("/") else arg for arg in command]


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to the workers this test started (by their Popen), then SIGKILL to any that outlive 15 s."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _certs_on_loopback(certs_service: Service, volumes: dict[str, Path], root: Path) -> list[str]:
    """The certs service's command with --out at ``root`` (its volumes are ``root``'s subfolders, as in the
    container) and 127.0.0.1 added to every host's names, since here the coordinator dials that address."""
    params = certs_params(certs_service.command)
    out = PurePosixPath(params["out"])
    for mount in certs_service.mounts:
        assert mount.target.parent == out, f"{mount.target} is not a folder of --out {out}"
        volumes[mount.source] = root / mount.target.name
    args: list[str] = []
    command = certs_service.command[1:]
    for i, arg in enumerate(command):
        previous = command[i - 1] if i else ""
        args.append(str(root) if previous == "--out" else f"{arg},127.0.0.1" if previous == "--host" else arg)
    return args


def test_compose_commands_train_on_loopback(
    tmp_path: Path, data_service: Service, workers: dict[str, Service], coordinator: Service, certs_service: Service
) -> None:
    volumes = {name: tmp_path / "volumes" / name for s in (data_service, *workers.values(), coordinator)
               for name in (m.source for m in s.mounts if m.is_volume)}
    logs = tmp_path / "logs"
    logs.mkdir()
    bin_dir = Path(sys.executable).parent

    # data: the service's own command; the image's workdir holds docker/make_shards.py as the repository does.
    program, *args = data_service.command
    assert program == "python"
    done = subprocess.run([sys.executable, *_host_command(args, data_service, volumes)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    # certs: the service's own command, writing into this machine's volumes.
    certs_args = _certs_on_loopback(certs_service, volumes, tmp_path / "volumes" / "certs")
    done = subprocess.run([str(bin_dir / "fl-coordinator"), *certs_args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    # workers: the services' argument lists, listening on a free loopback port instead of 0.0.0.0:8777.
    processes: list[Spawned] = []
    started: dict[str, LocalWorker] = {}
    try:
        for name, service in workers.items():
            args = service.command[1:]
            data = service.host_path(_option(args, "--data"), volumes)
            assert data.is_file(), f"{name}: the data step left no {data}"
            processes.append(
                spawn_worker(data, host="127.0.0.1", port=0, log_path=logs / f"{name}.log",
                             extra_args=[*_host_command(_without_options(args, {"--data", "--host", "--port", "--metrics-host",
                                                                                  "--metrics-port"}), service, volumes),
                                         "--metrics-port", "0"])
            )
        for name, process in zip(workers, processes):
            started[name] = wait_ready(process, timeout=60)

        # coordinator: its config with the loopback URLs and this machine's volume paths.
        config_path = _config_path(coordinator)
        raw = yaml.safe_load(_config_source(coordinator).read_text(encoding="utf-8"))
        raw["workers"] = [
            {**entry, "url": started[urlsplit(entry["url"]).hostname].url,
             "token_file": str(coordinator.host_path(entry["token_file"], volumes))}
            for entry in raw["workers"]
        ]
        assert all(entry["url"].startswith("wss://127.0.0.1:") for entry in raw["workers"]), raw["workers"]
        raw["tls"] = {key: str(coordinator.host_path(path, volumes)) for key, path in raw["tls"].items()}
        raw["evaluation"]["data"] = str(coordinator.host_path(raw["evaluation"]["data"], volumes))
        raw["output"] = str(coordinator.host_path(raw["output"], volumes))
        raw["metrics"] = {**raw["metrics"], "host": "127.0.0.1", "port": 0}  # three runs at once must not collide
        local_config = tmp_path / "config.yaml"
        local_config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        config = load_config(local_config)

        command = [str(local_config) if arg == config_path else arg for arg in coordinator.command]
        assert command != coordinator.command, "the config path appears verbatim in the coordinator's command"
        run = subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, f"fl-coordinator failed:\n{run.stderr[-4000:]}"
        assert re.search(r"^metrics: http://127\.0\.0\.1:\d+/metrics$", run.stderr, re.M), "no metrics endpoint announced"
    finally:
        _stop([spawned.process for spawned in processes])

    records = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, config.rounds + 1))
    assert all(r["workers"] >= config.sampling.min_workers for r in records), records
    assert (config.output / "model.safetensors").stat().st_size > 0
    assert records[-1]["accuracy"] > 0.9, records[-1]
    for name, spawned in zip(workers, processes):
        assert spawned.process.returncode == 0, f"{name} did not stop cleanly:\n{started[name].log_tail()}"
