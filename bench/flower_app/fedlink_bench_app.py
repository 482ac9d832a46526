"""The ServerApp and ClientApp that bench/flower_deployment.py runs on Flower 1.41's deployment runtime.

Two jobs, picked by the run config's ``workload`` (see pyproject.toml for every key):

- ``w1``: fedlink's ``mnist_cnn``; each SuperNode trains 1 epoch on its own shard (``--node-config shard=...``),
  the ServerApp runs FedAvg over all nodes every round and evaluates the global model on ``test-path`` after
  every round (centralised evaluation, ``evaluate_fn``).
- ``w2``: fedlink's ``sized_mlp`` (400 MB); each node does one SGD step on one seeded random batch; no evaluation.

The model code is fedlink's own ``common/models.py``, loaded by path (``models-path``), so both sides of the
benchmark train the very same module; nothing here imports fedlink. Data files are fedlink's ``.npy`` shards
(structured arrays with fields ``x`` and ``y``), always loaded with ``allow_pickle=False``.

The ServerApp writes what the benchmark measures to ``timing-path`` (JSON, rewritten atomically after every
round so that a crash still leaves the rounds done): its PID (how the orchestrator finds the process to sample),
its ``VmRSS`` when ``main`` starts (after the imports, before the model is built: the memory baseline), the time
stamps of each round (``configure_train`` entry, ``aggregate_train`` exit, end of the round's evaluation) and,
for W1, the accuracy and loss after each round, and at the end its own ``VmHWM``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

MiB = 1 << 20
WORKLOADS = ("w1", "w2")


# -- shared helpers -------------------------------------------------------------------------------------------------


def load_models(path: str) -> ModuleType:
    """fedlink's ``common/models.py``, imported from its file (fedlink itself is not installed here)."""
    if not path:
        raise ValueError("run config `models-path` is empty: pass fedlink's common/models.py")
    spec = importlib.util.spec_from_file_location("fedlink_models", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(models: ModuleType, config: dict[str, Any]) -> torch.nn.Module:
    workload = str(config["workload"])
    if workload == "w1":
        model: torch.nn.Module = models.mnist_cnn()
    elif workload == "w2":
        model = models.sized_mlp(
            megabytes=float(config["w2-megabytes"]),
            in_features=int(config["w2-in-features"]),
            num_classes=int(config["w2-num-classes"]),
        )
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")
    return model


def load_records(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32) and ``y`` (int64) of a fedlink shard file, without unpickling anything."""
    records = np.load(path, allow_pickle=False)
    x = np.ascontiguousarray(records["x"], dtype=np.float32)
    y = np.ascontiguousarray(records["y"]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux)."""
    values: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def set_threads(config: dict[str, Any]) -> None:
    threads = int(config.get("torch-threads", 1))
    if threads > 0:
        torch.set_num_threads(threads)


# -- ClientApp ------------------------------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this SuperNode's data; replies with the new weights and ``num-examples``."""
    config = dict(context.run_config)
    set_threads(config)
    started = time.perf_counter()
    models = load_models(str(config["models-path"]))
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    partition = int(context.node_config.get("partition-id", 0))
    # A distinct, reproducible stream per (seed, round, node).
    generator = torch.Generator().manual_seed(int(config["seed"]) * 1_000_003 + server_round * 1_009 + partition)

    model = build_model(models, config)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict(keep_input=False))
    del msg.content["arrays"]  # emptied above; drop the record too
    model.train()

    if config["workload"] == "w1":
        x, y = load_records(str(context.node_config["shard"]))
        batch_size = int(config["batch-size"])
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=float(config["momentum"]))
        total_loss, steps = 0.0, 0
        for _ in range(int(config["local-epochs"])):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total_loss += float(loss.item())
                steps += 1
        num_examples = len(y)
    else:
        batch_size = int(config["w2-batch-size"])
        inputs = torch.randn(batch_size, int(config["w2-in-features"]), generator=generator)
        labels = torch.randint(0, int(config["w2-num-classes"]), (batch_size,), generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config["w2-lr"]), momentum=float(config["w2-momentum"]))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        total_loss, steps, num_examples = float(loss.item()), 1, batch_size
        del optimizer, inputs, labels

    content = RecordDict({
        "arrays": ArrayRecord.from_torch_state_dict(model.state_dict(), keep_input=False),
        "metrics": MetricRecord({
            "num-examples": num_examples,
            "train-loss": total_loss / max(1, steps),
            "client-seconds": time.perf_counter() - started,
        }),
    })
    return Message(content=content, reply_to=msg)


# -- ServerApp ------------------------------------------------------------------------------------------------------

server_app = ServerApp()


class Timings:
    """What the ServerApp reports, rewritten to ``path`` (atomically) whenever it changes."""

    def __init__(self, path: str, workload: str) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "workload": workload, "status": "started",
            "rss_main_start": proc_status().get("VmRSS", 0), "configure": {}, "aggregated": {}, "round_end": {},
            "accuracy": {}, "loss": {}, "train_metrics": {},
        }
        self.save()

    def stamp(self, table: str, server_round: int, value: Any = None) -> None:
        self.data[table][str(server_round)] = time.time() if value is None else value
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class TimedFedAvg(FedAvg):
    """FedAvg that time-stamps the entry of ``configure_train`` and the exit of ``aggregate_train``."""

    def __init__(self, timings: Timings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timings = timings

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.timings.stamp("configure", server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failures = [msg.error.reason for msg in replies if msg.has_error()]
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed: {failures}")
        if len(replies) != self.min_train_nodes:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, expected {self.min_train_nodes}")
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.timings.stamp("aggregated", server_round)
        if metrics is not None:
            self.timings.stamp("train_metrics", server_round, dict(metrics))
        return arrays, metrics


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    workload = str(config["workload"])
    timings = Timings(str(config.get("timing-path", "")), workload)
    try:
        run_job(grid, config, timings)
    except BaseException as err:
        timings.data["status"] = f"failed: {type(err).__name__}: {err}"
        timings.data["server_status_end"] = proc_status()
        timings.save()
        raise
    timings.data["status"] = "finished"
    timings.data["server_status_end"] = proc_status()
    timings.save()


def run_job(grid: Grid, config: dict[str, Any], timings: Timings) -> None:
    set_threads(config)
    workload = str(config["workload"])
    workers = int(config["num-workers"])
    models = load_models(str(config["models-path"]))
    torch.manual_seed(int(config["seed"]))
    model = build_model(models, config)
    initial = ArrayRecord.from_torch_state_dict(model.state_dict(), keep_input=False)
    timings.data["model_bytes"] = int(sum(p.numel() * p.element_size() for p in model.state_dict().values()))
    timings.data["rss_model_built"] = proc_status().get("VmRSS", 0)
    timings.save()

    # Start the clock only once every SuperNode is connected, so that round 1 does not include their start-up.
    waited = time.time()
    while len(list(grid.get_node_ids())) < workers:
        time.sleep(0.2)
    timings.data["nodes_waited_seconds"] = time.time() - waited

    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    if workload == "w1":
        test_x, test_y = load_records(str(config["test-path"]))

        def evaluate_w1(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            correct, loss = 0, 0.0
            with torch.no_grad():
                for start in range(0, len(test_y), 1000):
                    logits = model(test_x[start:start + 1000])
                    target = test_y[start:start + 1000]
                    loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == target).sum())
            accuracy, mean_loss = correct / len(test_y), loss / len(test_y)
            timings.data["accuracy"][str(server_round)] = accuracy
            timings.data["loss"][str(server_round)] = mean_loss
            if server_round > 0:
                timings.stamp("round_end", server_round)
            return MetricRecord({"accuracy": accuracy, "loss": mean_loss})

        evaluate_fn = evaluate_w1
    else:
        del model  # W2 needs no server-side copy beyond the ArrayRecord being averaged

        def evaluate_w2(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round > 0:  # no evaluation: only the end-of-round time stamp
                timings.stamp("round_end", server_round)
            return None

        evaluate_fn = evaluate_w2

    strategy = TimedFedAvg(
        timings,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=workers,
        min_evaluate_nodes=0,
        min_available_nodes=workers,
    )
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(config["num-rounds"]),
        timeout=float(config["round-timeout"]),
        evaluate_fn=evaluate_fn,
    )
