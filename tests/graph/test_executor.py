from collections import Counter

import pytest

from noisecraft.graph import (
    ExecutionContext,
    ExecutionInterrupted,
    Executor,
    NodeExecutionError,
    OutputCache,
    PromptValidationError,
    run_workflow,
)
from tests.graph.stubs import chain_prompt, stub_registry


def run(executor, prompt, events=None):
    sink = events if events is not None else []
    return executor.execute(prompt, ExecutionContext(), on_event=lambda n, d: sink.append((n, d)))


def test_runs_only_needed_nodes_in_topological_order():
    calls = Counter()
    events = []
    result = run(Executor(stub_registry(calls)), chain_prompt(), events)
    assert result.status == "success"
    assert result.outputs == {"5": {"value": [10]}, "7": {"value": [7]}}
    assert "8" not in result.executed and calls["Const"] == 3  # node 8 feeds no output
    order = result.executed
    for before, after in [("1", "3"), ("2", "3"), ("3", "4"), ("4", "5"), ("6", "7")]:
        assert order.index(before) < order.index(after)
    names = [n for n, _ in events]
    assert names[0] == "execution_start" and names[1] == "execution_cached"
    assert names[-2:] == ["executing", "execution_success"]
    assert events[-2][1]["node"] is None
    executing = [d["node"] for n, d in events if n == "executing"][:-1]
    assert executing == order
    progress = [d for n, d in events if n == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "4"), (2, 3, "4"),
                                                                      (3, 3, "4")]
    executed = {d["node"]: d["output"] for n, d in events if n == "executed"}
    assert executed == {"5": {"value": [10]}, "7": {"value": [7]}}


def test_cache_reruns_only_dependents_of_a_changed_widget():
    calls = Counter()
    executor = Executor(stub_registry(calls))
    run(executor, chain_prompt())
    assert calls == Counter({"Const": 3, "Add": 1, "Scale": 1, "Show": 2})
    calls.clear()
    events = []
    again = run(executor, chain_prompt(), events)
    assert calls == Counter() and again.executed == []
    assert again.outputs == {"5": {"value": [10]}, "7": {"value": [7]}}
    cached = next(d["nodes"] for n, d in events if n == "execution_cached")
    assert sorted(cached) == ["1", "2", "3", "4", "5", "6", "7"]
    changed = chain_prompt()
    changed["4"]["inputs"]["mode"] = "triple"
    calls.clear()
    third = run(executor, changed)
    assert calls == Counter({"Scale": 1, "Show": 1})
    assert third.executed == ["4", "5"] and third.outputs["5"] == {"value": [15]}
    changed["2"]["inputs"]["value"] = 4  # upstream change: Add, Scale, Show, not node 6/7
    calls.clear()
    assert run(executor, changed).executed == ["2", "3", "4", "5"]


def test_cache_is_bounded_and_owned_by_the_executor():
    calls = Counter()
    registry = stub_registry(calls)
    small = Executor(registry, cache=OutputCache(max_entries=2))
    run(small, chain_prompt())
    assert len(small.cache) == 2
    run(Executor(registry), chain_prompt())  # a second executor shares nothing
    assert calls["Show"] == 4


def test_execution_error_is_reported_in_comfyui_shape():
    calls = Counter()
    prompt = {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Boom", "inputs": {"x": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }
    events = []
    result = run(Executor(stub_registry(calls)), prompt, events)
    assert result.status == "error" and calls["Show"] == 0
    error = dict(events)["execution_error"]
    assert error["node_id"] == "2" and error["node_type"] == "Boom"
    assert error["exception_message"] == "boom" and error["exception_type"] == "RuntimeError"
    assert error["executed"] == ["1"] and error["current_inputs"] == {"x": "['1', 0]"}
    with pytest.raises(NodeExecutionError, match="node 2 \\(Boom\\) failed"):
        run_workflow(prompt, registry=stub_registry(calls), context=ExecutionContext())


def test_interruption_between_nodes():
    calls = Counter()
    events = []
    result = run(Executor(stub_registry(calls, cancel_after="Show")), chain_prompt(), events)
    assert result.status == "interrupted"
    assert calls["Show"] == 1  # the first output ran, then nothing more
    info = dict(events)["execution_interrupted"]
    assert info == result.error and info["executed"] == result.executed
    assert "execution_success" not in dict(events)
    assert result.executed[-1] in ("5", "7") and len(result.executed) < 7
    assert info["node_id"] not in result.executed


def test_interruption_inside_a_node_through_its_context():
    calls = Counter()
    registry = stub_registry(calls, cancel_after="Scale")
    with pytest.raises(ExecutionInterrupted, match="node 4"):
        run_workflow(chain_prompt(), registry=registry, context=ExecutionContext())
    assert calls["Scale"] == 1 and calls["Show"] <= 1 and calls["Add"] == 1


def test_cancelled_before_start_runs_nothing():
    calls = Counter()
    context = ExecutionContext()
    context.cancel.cancel()
    result = Executor(stub_registry(calls)).execute(chain_prompt(), context)
    assert result.status == "interrupted" and sum(calls.values()) == 0


def test_nothing_runs_when_validation_fails():
    calls = Counter()
    prompt = chain_prompt()
    prompt["6"]["inputs"]["value"] = 1000
    with pytest.raises(PromptValidationError) as info:
        run_workflow(prompt, registry=stub_registry(calls), context=ExecutionContext())
    assert sum(calls.values()) == 0
    assert "6" in info.value.result.node_errors


def test_overrides_set_inputs_by_node_and_name():
    calls = Counter()
    outputs = run_workflow(chain_prompt(), registry=stub_registry(calls),
                           context=ExecutionContext(), overrides={"6.value": 9})
    assert outputs["7"] == {"value": [9]}
    with pytest.raises(KeyError, match="no node '42'"):
        run_workflow(chain_prompt(), registry=stub_registry(calls), context=ExecutionContext(),
                     overrides={"42.seed": 1})
