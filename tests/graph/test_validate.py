from collections import Counter

from noisecraft.graph import validate_prompt
from tests.graph.stubs import chain_prompt, stub_registry

REGISTRY = stub_registry(Counter())


def errors_of(prompt):
    result = validate_prompt(prompt, REGISTRY)
    assert not result.ok
    return result, {
        node_id: [(e["type"], e["extra_info"].get("input_name"), e["message"])
                  for e in entry["errors"]]
        for node_id, entry in result.node_errors.items()
    }


def test_valid_prompt_passes_and_coerces_values():
    prompt = chain_prompt()
    prompt["1"]["inputs"]["value"] = "2"
    prompt["3"]["inputs"]["bias"] = 1
    result = validate_prompt(prompt, REGISTRY)
    assert result.ok and result.node_errors == {} and sorted(result.outputs) == ["5", "7"]
    assert result.prompt["1"]["inputs"]["value"] == 2
    assert isinstance(result.prompt["3"]["inputs"]["bias"], float)
    assert prompt["1"]["inputs"]["value"] == "2"  # the caller's prompt is untouched


def test_every_error_is_reported_with_node_and_input():
    prompt = chain_prompt()
    prompt["1"]["inputs"]["value"] = 101  # too big
    prompt["2"]["inputs"]["value"] = -1  # too small
    prompt["12"] = {"class_type": "Add", "inputs": {"a": ["1", 0]}}  # missing required "b"
    prompt["13"] = {"class_type": "Show", "inputs": {"x": ["12", 0]}}
    prompt["3"]["inputs"]["bias"] = "lots"  # wrong type
    prompt["4"]["inputs"]["mode"] = "quadruple"  # unknown choice
    prompt["6"]["inputs"]["value"] = ["99", 0]  # link to a missing node
    prompt["14"] = {"class_type": "Show", "inputs": {"x": 5}}  # constant where a link is needed
    prompt["9"] = {"class_type": "Text", "inputs": {"text": "x"}}
    prompt["10"] = {"class_type": "Show", "inputs": {"x": ["9", 0]}}  # STRING -> NUMBER
    prompt["11"] = {"class_type": "Show", "inputs": {"x": ["1", 3]}}  # no such output slot
    result, errors = errors_of(prompt)
    kinds = {n: sorted((t, i) for t, i, _ in errs) for n, errs in errors.items()}
    assert kinds == {
        "1": [("value_bigger_than_max", "value")],
        "2": [("value_smaller_than_min", "value")],
        "3": [("invalid_input_type", "bias")],
        "12": [("required_input_missing", "b")],
        "4": [("value_not_in_list", "mode")],
        "6": [("bad_linked_input", "value")],
        "14": [("invalid_input_type", "x")],
        "10": [("return_type_mismatch", "x")],
        "11": [("bad_linked_input", "x")],
    }
    for node_id, errs in errors.items():
        for _, input_name, message in errs:
            assert f"node {node_id}" in message and repr(input_name) in message
    assert "allowed 0..100" in errors["1"][0][2]
    assert "['double', 'triple']" in errors["4"][0][2]
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert result.node_errors["1"]["class_type"] == "Const"
    assert sorted(result.node_errors["1"]["dependent_outputs"]) == ["11", "13", "5"]
    body = result.as_response()
    assert set(body) == {"error", "node_errors"}
    assert set(body["node_errors"]["4"]) == {"errors", "dependent_outputs", "class_type"}
    assert set(body["node_errors"]["4"]["errors"][0]) == {"type", "message", "details",
                                                          "extra_info"}


def test_unknown_class_is_reported_anywhere():
    prompt = chain_prompt()
    prompt["8"]["class_type"] = "NoSuchNode"
    result, errors = errors_of(prompt)
    assert errors["8"][0][0] == "missing_node_type"
    assert "NoSuchNode" in errors["8"][0][2] and "#8" in errors["8"][0][2]
    assert result.error["type"] == "missing_node_type"


def test_cycle_is_detected():
    prompt = chain_prompt()
    prompt["3"]["inputs"]["b"] = ["4", 0]  # 3 -> 4 -> 3
    result, errors = errors_of(prompt)
    assert {n for n, errs in errors.items() if errs[0][0] == "dependency_cycle"} == {"3", "4"}
    assert "3 -> 4" in errors["3"][0][2]


def test_self_loop_is_a_cycle():
    prompt = chain_prompt()
    prompt["3"]["inputs"]["b"] = ["3", 0]
    _, errors = errors_of(prompt)
    assert errors["3"][0][0] == "dependency_cycle"


def test_no_output_node():
    result = validate_prompt({"1": {"class_type": "Const", "inputs": {"value": 1}}}, REGISTRY)
    assert result.error["type"] == "prompt_no_outputs" and result.node_errors == {}


def test_unused_nodes_are_not_validated():
    prompt = chain_prompt()
    prompt["8"]["inputs"]["value"] = 1000  # feeds no output: ComfyUI ignores it too
    assert validate_prompt(prompt, REGISTRY).ok
