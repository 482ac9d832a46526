"""The worker's per-run store and per-round context: kept across rounds, dropped at round end, bounded."""

from __future__ import annotations

from fedlink.worker.memory import WorkerMemory


def test_run_store_outlives_rounds_and_round_context_does_not() -> None:
    memory = WorkerMemory()
    memory.run("job").data["residual"] = 1
    memory.round("job", 1)["keys"] = "secret"
    assert memory.round("job", 1) == {"keys": "secret"}, "stages of one round share the context"
    assert memory.round("job", 2) == {}, "a new round starts empty"
    assert ("job", 1) not in memory.open_rounds(), "and drops the run's earlier rounds"
    assert memory.run("job").data == {"residual": 1}
    memory.end_round("job", 2)
    assert memory.open_rounds() == []


def test_runs_are_kept_apart_and_bounded() -> None:
    memory = WorkerMemory(max_runs=2)
    for run in ("a", "b", "c"):
        memory.run(run).data["x"] = run
        memory.round(run, 1)["k"] = run
    assert memory.run("b").data == {"x": "b"}
    assert memory.run("a").data == {}, "the least recently used run was forgotten"
    assert ("a", 1) not in memory.open_rounds()


def test_idle_round_contexts_expire() -> None:
    memory = WorkerMemory(round_ttl=0.0)
    memory.round("job", 1)["keys"] = 1
    assert memory.open_rounds() == []
