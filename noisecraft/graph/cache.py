"""Results cached by input signature, in a bounded LRU owned by an executor.

A node's signature hashes its class, its constant inputs, its fingerprint (for nodes whose
result depends on something outside the graph, e.g. a file) and, for each link, the upstream
node's signature and output index.  So a changed widget changes the signature of its node and
of everything downstream, and nothing else: re-running re-executes only those.
(ComfyUI's ``comfy_execution/caching.py`` keys its cache the same way.)
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from noisecraft.graph import dag


@dataclass(frozen=True)
class CachedResult:
    values: tuple[Any, ...]
    ui: dict[str, Any] | None


class OutputCache:
    """At most ``max_entries`` results, least recently used evicted first."""

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[str, CachedResult] = OrderedDict()

    def get(self, signature: str) -> CachedResult | None:
        item = self._items.get(signature)
        if item is not None:
            self._items.move_to_end(signature)
        return item

    def __contains__(self, signature: str) -> bool:
        return signature in self._items

    def put(self, signature: str, result: CachedResult) -> None:
        if self.max_entries == 0:
            return
        self._items[signature] = result
        self._items.move_to_end(signature)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))


def signatures(
    prompt: Mapping[str, Mapping[str, Any]], order: list[str], fingerprints: Mapping[str, Any]
) -> dict[str, str]:
    """Signature of every node in ``order`` (dependencies first)."""
    out: dict[str, str] = {}
    for node_id in order:
        node = prompt[node_id]
        inputs = {}
        for name, value in node.get("inputs", {}).items():
            if dag.is_link(value):
                inputs[name] = ["link", out[str(value[0])], value[1]]
            else:
                inputs[name] = ["value", value]
        text = _canonical([node["class_type"], inputs, fingerprints.get(node_id)])
        out[node_id] = hashlib.sha256(text.encode()).hexdigest()
    return out
