"""Graph structure of an API-format prompt: links, what outputs need, order, cycles."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Prompt = Mapping[str, Mapping[str, Any]]


def is_link(value: Any) -> bool:
    """ComfyUI's rule: any list in an input position is a link ``[node_id, output_index]``."""
    return isinstance(value, list | tuple)


def links(node: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """Well-formed links of one node: input name -> (source node id, output index)."""
    out = {}
    for name, value in node.get("inputs", {}).items():
        if is_link(value) and len(value) == 2 and isinstance(value[1], int):
            out[name] = (str(value[0]), value[1])
    return out


def upstream(prompt: Prompt, node_id: str) -> list[str]:
    return [src for src, _ in links(prompt[node_id]).values() if src in prompt]


def needed_nodes(prompt: Prompt, outputs: Iterable[str]) -> list[str]:
    """Every node the given output nodes depend on (themselves included), in discovery order."""
    seen: dict[str, None] = {}
    stack = list(outputs)[::-1]
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen[node_id] = None
        stack.extend(reversed(upstream(prompt, node_id)))
    return list(seen)


def find_cycles(prompt: Prompt, nodes: Iterable[str] | None = None) -> list[list[str]]:
    """Strongly connected groups that form a cycle (Tarjan), each listed once."""
    members = list(prompt) if nodes is None else [n for n in nodes if n in prompt]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:  # iterative Tarjan: deep graphs must not hit recursion limits
        nonlocal counter
        work = [(root, iter(upstream(prompt, root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(upstream(prompt, child))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    group.append(top)
                    if top == node:
                        break
                if len(group) > 1 or node in upstream(prompt, node):
                    cycles.append(sorted(group))

    for node_id in members:
        if node_id not in index:
            visit(node_id)
    return cycles


def topological_order(prompt: Prompt, nodes: Iterable[str]) -> list[str]:
    """Dependencies first; ties keep the given order.  The nodes must form no cycle."""
    wanted = list(dict.fromkeys(nodes))
    members = set(wanted)
    done: set[str] = set()
    order: list[str] = []
    for root in wanted:
        stack = [(root, False)]
        while stack:
            node_id, expanded = stack.pop()
            if node_id in done:
                continue
            if expanded:
                done.add(node_id)
                order.append(node_id)
                continue
            stack.append((node_id, True))
            for dep in reversed(upstream(prompt, node_id)):
                if dep in members and dep not in done:
                    stack.append((dep, False))
    return order
