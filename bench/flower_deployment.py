"""Flower's side of bench/vs_flower.py: the same jobs on Flower 1.41's *deployment* runtime, with real processes.

Why a separate script: fedlink is compared with Flower as Flower is deployed (a SuperLink, one SuperNode per
worker, ``flwr run``), not with its in-process simulation engine (that is bench/simulation_flower.py). It runs
in Flower's own virtual environment and never imports fedlink: the Flower app in ``bench/flower_app/`` reads
fedlink's ``common/models.py`` by path and the same ``.npy`` shard files fedlink trains on.

    /tmp/flwr-venv/bin/python bench/flower_deployment.py --workload w1 \\
        --shards D/shard-0.npy D/shard-1.npy D/shard-2.npy --test D/test.npy --rounds 10 --out-json w1.json
    /tmp/flwr-venv/bin/python bench/flower_deployment.py --workload w2 --rounds 3 --out-json w2.json

What it starts, all on 127.0.0.1, each with its own ``FLWR_HOME`` and log file under ``--workdir``:

- ``flower-superlink --insecure --isolation subprocess --disable-runtime-dependency-installation``. In 1.41
  the SuperLink serves its Fleet, Control and Runtime (the former ServerAppIo) APIs over HTTP on one port
  (``--host``/``--port``); the separate per-API address flags are deprecated. With subprocess isolation it
  starts ``flower-superexec`` itself, which starts one ``flwr-serverapp`` process per run.
- one ``flower-supernode --insecure --superlink 127.0.0.1:PORT --port OWN_PORT`` per worker (``OWN_PORT`` is its
  ClientAppIo/Runtime API) with ``--node-config 'partition-id=I num-partitions=N shard="PATH"'``.
- ``flwr run bench/flower_app bench --run-config RUN.toml --stream``, where ``bench`` is a SuperLink connection
  written to the CLI's ``FLWR_HOME/config.toml``; ``--stream`` makes the command return once the run has
  ended, and ``flwr ls --run-id`` then reports its final status.

What it measures (one JSON object, printed as the last line of stdout and written to ``--out-json``):

- ``round_seconds``: per round, the ServerApp's wall time between the ends of successive rounds (end = after the
  round's server-side evaluation for W1, after ``aggregate_train`` for W2); round 1 counts from the entry of
  ``configure_train`` of round 1, which the ServerApp only reaches once all SuperNodes are connected.
  ``train_seconds`` is ``configure_train`` entry to ``aggregate_train`` exit of each round.
- ``accuracy`` / ``loss`` after each round (W1; ``initial_accuracy`` is the untrained model's).
- ``flwr_run_wall_seconds``: ``flwr run --stream`` from start to exit (FAB build and upload, ServerApp start-up,
  the initial evaluation, all rounds, the log stream's end).
- Memory, in bytes and MiB. **ServerApp**: the ``flwr-serverapp`` process the SuperLink's SuperExec started for
  this run. It is identified by the PID the ServerApp itself writes into its timing file (``os.getpid()`` at
  the start of ``main``); the script checks that this PID descends from the SuperLink and records its
  ancestry. Its peak is the larger of its own ``VmHWM`` at the end of ``main`` and ``VmHWM``/``VmRSS`` sampled
  from ``/proc/PID/status`` every ``--sample-interval`` seconds; its baseline is its ``VmRSS`` at the start of
  ``main`` (torch and flwr imported, model not yet built), so ``serverapp_peak_growth_bytes`` is comparable to
  fedlink's "peak during run above RSS after imports". **SuperLink**: ``VmHWM`` of the ``flower-superlink``
  process just before it is stopped, against its ``VmRSS`` once all SuperNodes were up, before ``flwr run``.

Every process started here, and everything they started (SuperExec, ServerApp, ClientApp processes), is
stopped on the way out (SIGTERM by PID, then SIGKILL), also on errors and on ``--timeout``; on failure the
tails of the logs are printed to stderr together with their paths. Logs are kept in ``--workdir``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "bench" / "flower_app"
MODELS = ROOT / "common" / "models.py"
MiB = 1 << 20
CONNECTION = "bench"  # the SuperLink connection name in the CLI's config.toml


class BenchError(RuntimeError):
    """The benchmark could not produce a valid result."""


# -- processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return int(fields[1]), int(fields[19])


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def all_parents() -> dict[int, tuple[int, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def descendants(roots: list[int]) -> list[tuple[int, int]]:
    """(PID, start time) of every live descendant of ``roots`` (not the roots themselves)."""
    table = all_parents()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append((child, table[child][1]))
            stack.append(child)
    return found


def ancestry(pid: int, stop_at: int) -> list[dict[str, Any]]:
    """``pid`` and its ancestors up to ``stop_at`` (included), with their command lines; [] if not below it."""
    chain = []
    while pid > 1 and (stat := proc_stat(pid)) is not None:
        # The run's access token is a credential: keep it out of the report.
        chain.append({"pid": pid, "cmdline": re.sub(r"(--token)\s+\S+", r"\1 <redacted>", proc_cmdline(pid))})
        if pid == stop_at:
            return chain
        pid = stat[0]
    return []


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


@dataclass
class Processes:
    """Everything this script started; ``stop_all`` ends them and all their descendants, by PID."""

    items: list[Started] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # descendant PID -> start time, remembered while alive

    def start(self, name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path) -> Started:
        handle = log.open("wb")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd)
        started = Started(name, process, log, handle)
        self.items.append(started)
        return started

    def remember_descendants(self) -> None:
        """Record live descendants now, should their parent die and they be re-parented out of our sight.

        Rooted at this script itself: as a subreaper it also adopts the orphans of the processes it started.
        """
        own = {item.process.pid for item in self.items}
        for pid, start in descendants([os.getpid()]):
            if pid not in own:
                self.seen[pid] = start

    def stop_all(self, grace: float = 10.0) -> None:
        self.remember_descendants()
        targets: list[tuple[int, int]] = list(self.seen.items())
        for item in self.items:
            if item.process.poll() is None and (stat := proc_stat(item.process.pid)) is not None:
                targets.append((item.process.pid, stat[1]))
        for pid, start in targets:  # descendants were recorded (and are signalled) before the processes we started
            _signal_if_same(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + grace
        adopted = list(self.seen)
        while time.monotonic() < deadline and any(_alive_same(pid, start) for pid, start in targets):
            for item in self.items:
                item.process.poll()  # reap our direct children
            reap(adopted)
            time.sleep(0.1)
        for pid, start in targets:
            _signal_if_same(pid, start, signal.SIGKILL)
        for item in self.items:
            try:
                item.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            item.handle.close()
        # Anything adopted since (as subreaper) that was not yet recorded: stop and reap it too.
        time.sleep(0.2)
        self.remember_descendants()
        for pid, start in self.seen.items():
            _signal_if_same(pid, start, signal.SIGKILL)
        time.sleep(0.2)
        reap(list(self.seen))


def _alive_same(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    if stat is None or stat[1] != start:
        return False
    try:  # a zombie still has a /proc entry; it is gone as far as we are concerned
        return not Path(f"/proc/{pid}/status").read_text().split("State:")[1].lstrip().startswith("Z")
    except (OSError, IndexError):
        return False


def _signal_if_same(pid: int, start: int, sig: signal.Signals) -> None:
    """Signal ``pid`` only if it is still the process we saw (same start time), never a recycled PID."""
    if _alive_same(pid, start):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def become_subreaper() -> bool:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER), so they can be found, stopped and reaped here.

    SuperLink and SuperNodes start SuperExec and app processes in new sessions; should one of them die first,
    its children would otherwise be re-parented to PID 1 and linger as zombies where PID 1 does not reap.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap(pids: list[int]) -> None:
    """Collect the exit status of adopted descendants that have ended (never of our own Popen children)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (or already reaped)
            pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<cannot read: {err}>"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(port: int, started: Started, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise BenchError(f"{started.name} exited with {started.process.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise BenchError(f"{started.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


# -- memory sampling ------------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every ``interval`` s: the SuperLink's and the ServerApp's VmRSS/VmHWM, and the process tree."""

    def __init__(self, superlink_pid: int, timing_path: Path, processes: Processes, interval: float) -> None:
        super().__init__(daemon=True)
        self.superlink_pid, self.timing_path, self.processes, self.interval = (
            superlink_pid, timing_path, processes, interval)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.superlink_peak = 0
        self.serverapp_pid: int | None = None
        self.serverapp_ancestry: list[dict[str, Any]] = []
        self.serverapp_peak = 0
        self.serverapp_samples = 0
        self.error: str | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sample()
            except Exception as err:  # keep sampling; report the first problem
                self.error = self.error or f"{type(err).__name__}: {err}"
            self.stopping.wait(self.interval)

    def sample(self) -> None:
        with self.lock:
            self.processes.remember_descendants()
            memory = proc_memory(self.superlink_pid)
            self.superlink_peak = max(self.superlink_peak, memory.get("VmHWM", 0), memory.get("VmRSS", 0))
            if self.serverapp_pid is None:
                self.serverapp_pid = self._find_serverapp()
            if self.serverapp_pid is not None:
                memory = proc_memory(self.serverapp_pid)
                if memory:
                    self.serverapp_samples += 1
                    self.serverapp_peak = max(self.serverapp_peak, memory.get("VmHWM", 0), memory.get("VmRSS", 0))

    def _find_serverapp(self) -> int | None:
        try:
            pid = int(json.loads(self.timing_path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        chain = ancestry(pid, stop_at=self.superlink_pid)
        if not chain:
            raise BenchError(f"the ServerApp's PID {pid} does not descend from the SuperLink")
        self.serverapp_ancestry = chain
        return pid

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.sample()  # a last look (the SuperLink is still alive here)


# -- the benchmark --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["w1", "w2"], required=True)
    parser.add_argument("--shards", type=Path, nargs="*", default=[],
                        help="one fedlink .npy shard per worker (W1: required; W2: optional, only counted: its "
                             "clients train on seeded random batches)")
    parser.add_argument("--test", type=Path, help="W1: the held-out .npy evaluated on the server after every round")
    parser.add_argument("--workers", type=int, default=3, help="W2 without --shards: number of SuperNodes")
    parser.add_argument("--rounds", type=int, help="default: 10 for w1, 3 for w2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the ServerApp and each ClientApp")
    parser.add_argument("--models", type=Path, default=MODELS, help="fedlink's common/models.py")
    parser.add_argument("--app", type=Path, default=APP_DIR, help="the Flower app folder")
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--workdir", type=Path, help="logs and temp files (kept); default: a new temp folder")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for everything")
    parser.add_argument("--sample-interval", type=float, default=0.2)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 10 if args.workload == "w1" else 3
    if args.workload == "w1" and (not args.shards or args.test is None):
        parser.error("w1 needs --shards and --test")
    if args.shards:
        args.workers = len(args.shards)
    for path in [*args.shards, *([args.test] if args.test else []), args.models, args.app / "pyproject.toml"]:
        if not path.is_file():
            parser.error(f"no such file: {path}")
        if '"' in str(path.resolve()) or "\n" in str(path.resolve()):
            parser.error(f"unsupported character in path: {path}")
    return args


def flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({
        "FLWR_HOME": str(home),
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),  # SuperLink/SuperNode start flower-superexec etc.
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def run_benchmark(args: argparse.Namespace, workdir: Path, processes: Processes) -> dict[str, Any]:
    deadline = time.monotonic() + args.timeout
    load_before = os.getloadavg()[0]  # timings mean little on a machine that is busy with something else
    bin_dir = Path(sys.executable).parent
    timing_path = workdir / "serverapp-timings.json"
    timing_path.unlink(missing_ok=True)

    # SuperLink: Fleet, Control and Runtime APIs on one HTTP port.
    link_port = free_port()
    superlink = processes.start(
        "superlink",
        [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
         "--isolation", "subprocess", "--disable-runtime-dependency-installation"],
        workdir / "superlink.log", flower_env(workdir / "home-superlink"), workdir,
    )
    wait_for_port(link_port, superlink, timeout=120)
    print(f"SuperLink PID {superlink.process.pid} on 127.0.0.1:{link_port}", file=sys.stderr, flush=True)

    nodes = []
    for i in range(args.workers):
        port = free_port()
        node_config = f"partition-id={i} num-partitions={args.workers}"
        if args.shards:
            node_config += f" shard={json.dumps(str(args.shards[i].resolve()))}"
        nodes.append((processes.start(
            f"supernode-{i}",
            [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
             "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
            workdir / f"supernode-{i}.log", flower_env(workdir / f"home-supernode-{i}"), workdir,
        ), port))
    for node, port in nodes:
        wait_for_port(port, node, timeout=120)
    time.sleep(3.0)  # let the nodes register and the SuperLink settle before its baseline
    for item in processes.items:
        if item.process.poll() is not None:
            raise BenchError(f"{item.name} exited with {item.process.returncode} during start-up")
    superlink_rss_start = proc_memory(superlink.process.pid).get("VmRSS", 0)

    # The CLI's SuperLink connection, and the run's configuration.
    cli_home = workdir / "home-cli"
    cli_env = flower_env(cli_home)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_config = {
        "workload": args.workload, "num-rounds": args.rounds, "num-workers": args.workers, "seed": args.seed,
        "models-path": str(args.models.resolve()), "test-path": str(args.test.resolve()) if args.test else "",
        "timing-path": str(timing_path), "torch-threads": args.threads, "round-timeout": float(args.timeout),
    }
    run_config_path = workdir / "run-config.toml"
    run_config_path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in run_config.items()))

    sampler = Sampler(superlink.process.pid, timing_path, processes, args.sample_interval)
    sampler.start()
    flwr_log = workdir / "flwr-run.log"
    started = time.perf_counter()
    flwr_run = processes.start(
        "flwr-run",
        [str(bin_dir / "flwr"), "run", str(args.app.resolve()), CONNECTION, "--run-config", str(run_config_path),
         "--stream"],
        flwr_log, cli_env, workdir,
    )
    try:
        while flwr_run.process.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {args.timeout:.0f}s (flwr run still streaming)")
            for item in processes.items:
                if item is not flwr_run and item.process.poll() is not None:
                    raise BenchError(f"{item.name} exited with {item.process.returncode} during the run")
            time.sleep(0.2)
        wall = time.perf_counter() - started
    finally:
        sampler.stop()
    if flwr_run.process.returncode != 0:
        raise BenchError(f"flwr run exited with {flwr_run.process.returncode}")
    superlink_end = proc_memory(superlink.process.pid)

    match = re.search(r"Successfully started run (\d+)", flwr_log.read_text(errors="replace"))
    if match is None:
        raise BenchError("no run ID in flwr run's output")
    run_id = int(match.group(1))
    listed = subprocess.run(
        [str(bin_dir / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=cli_env, cwd=workdir, timeout=60,
    )
    (workdir / "flwr-ls.json").write_text(listed.stdout + listed.stderr)
    run_status = _run_status(listed.stdout, run_id)

    try:
        timings = json.loads(timing_path.read_text())
    except (OSError, ValueError) as err:
        raise BenchError(f"no ServerApp timings in {timing_path}: {err}")
    if timings.get("status") != "finished" or not run_status.startswith("finished:completed"):
        raise BenchError(f"run {run_id} did not complete: status {run_status!r}, ServerApp {timings.get('status')!r}")
    if sampler.error:
        raise BenchError(f"memory sampling failed: {sampler.error}")

    rounds = range(1, args.rounds + 1)
    ends = [timings["round_end"][str(r)] for r in rounds]
    starts = [timings["configure"]["1"], *ends[:-1]]
    result: dict[str, Any] = {
        "framework": "flower", "runtime": "deployment", "flwr_version": _version("flwr"),
        "torch_version": _version("torch"), "workload": args.workload, "workers": args.workers,
        "rounds": args.rounds, "seed": args.seed, "threads": args.threads, "run_id": run_id, "run_status": run_status,
        "round_seconds": [end - start for start, end in zip(starts, ends)],
        "train_seconds": [timings["aggregated"][str(r)] - timings["configure"][str(r)] for r in rounds],
        "flwr_run_wall_seconds": wall,
        "nodes_waited_seconds": timings.get("nodes_waited_seconds"),
        "model_bytes": timings.get("model_bytes"),
    }
    if args.workload == "w1":
        result["accuracy"] = [timings["accuracy"][str(r)] for r in rounds]
        result["loss"] = [timings["loss"][str(r)] for r in rounds]
        result["initial_accuracy"] = timings["accuracy"].get("0")

    own_peak = int(timings.get("server_status_end", {}).get("VmHWM", 0))
    serverapp_peak = max(own_peak, sampler.serverapp_peak)
    serverapp_start = int(timings["rss_main_start"])
    superlink_peak = max(superlink_end.get("VmHWM", 0), sampler.superlink_peak)
    memory = {
        "serverapp_pid": sampler.serverapp_pid,
        "serverapp_process": sampler.serverapp_ancestry,
        "serverapp_rss_start_bytes": serverapp_start,
        "serverapp_rss_model_built_bytes": timings.get("rss_model_built"),
        "serverapp_peak_bytes": serverapp_peak,
        "serverapp_peak_growth_bytes": serverapp_peak - serverapp_start,
        "serverapp_peak_self_vmhwm_bytes": own_peak,
        "serverapp_peak_sampled_bytes": sampler.serverapp_peak,
        "serverapp_samples": sampler.serverapp_samples,
        "superlink_pid": superlink.process.pid,
        "superlink_rss_start_bytes": superlink_rss_start,
        "superlink_peak_bytes": superlink_peak,
        "superlink_peak_growth_bytes": superlink_peak - superlink_rss_start,
    }
    result.update(memory)
    for key in [k for k in memory if k.endswith("_bytes")]:
        value = memory[key]
        result[key[: -len("_bytes")] + "_mib"] = round(value / MiB, 1) if isinstance(value, int) else None
    result["memory_method"] = (
        "ServerApp = the flwr-serverapp process (PID written by the app's main, checked to descend from the "
        "SuperLink via its SuperExec); peak = max(its own VmHWM at the end of main, VmHWM/VmRSS sampled every "
        f"{args.sample_interval}s); baseline = its VmRSS at the start of main. SuperLink = flower-superlink's "
        "VmHWM after the run; baseline = its VmRSS with all SuperNodes connected, before flwr run."
    )
    result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count()}
    result["workdir"] = str(workdir)
    return result


def _run_status(text: str, run_id: int) -> str:
    try:
        data = json.loads(text)
        for run in data.get("runs", []):
            if int(run.get("run-id", -1)) == run_id:
                return str(run.get("status", "unknown"))
    except (ValueError, AttributeError, TypeError):
        pass
    return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main() -> int:
    args = parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix=f"flower-{args.workload}-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}", file=sys.stderr, flush=True)
    become_subreaper()
    processes = Processes()
    failed = False
    # SIGTERM (e.g. from a harness's timeout) should still run the finally block below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_benchmark(args, workdir, processes)
    except (BenchError, subprocess.SubprocessError, OSError, KeyError) as err:
        failed = True
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except BaseException:
        failed = True
        raise
    finally:
        processes.stop_all()
        if failed:
            for item in processes.items:
                code = item.process.returncode
                print(f"\n--- {item.name} (exit {code}), log {item.log}:\n{tail(item.log)}", file=sys.stderr)
            print(f"\nall logs kept in {workdir}", file=sys.stderr)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
