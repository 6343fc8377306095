"""The node registry: an object mapping class names to node classes, passed to the engine.

There is no global list: whoever builds the engine builds a registry and registers what it
wants (``noisecraft.nodes.register_builtin_nodes(registry)`` adds the built-in nodes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from noisecraft.graph.schema import Node, NodeSchema


class NodeRegistry:
    def __init__(self, nodes: Iterable[type[Node]] = ()) -> None:
        self._nodes: dict[str, type[Node]] = {}
        for node in nodes:
            self.register(node)

    def register(self, node: type[Node], *, replace: bool = False) -> type[Node]:
        """Add a node class (usable as a class decorator).  Refuses a second class under the
        same name unless ``replace=True``."""
        schema = getattr(node, "schema", None)
        if not isinstance(schema, NodeSchema):
            raise TypeError(
                f"{getattr(node, '__name__', node)!r} has no NodeSchema in its 'schema' attribute; "
                "declare `schema = NodeSchema(name=..., inputs=[...], outputs=[...])`"
            )
        if not callable(getattr(node, "execute", None)):
            raise TypeError(f"node {schema.name!r} has no execute() classmethod")
        if schema.name in self._nodes and not replace and self._nodes[schema.name] is not node:
            raise ValueError(
                f"a node named {schema.name!r} is already registered "
                f"({self._nodes[schema.name].__qualname__}); pass replace=True to override it"
            )
        self._nodes[schema.name] = node
        return node

    def register_all(self, nodes: Iterable[type[Node]], *, replace: bool = False) -> None:
        for node in nodes:
            self.register(node, replace=replace)

    def get(self, name: str) -> type[Node] | None:
        return self._nodes.get(name)

    def __getitem__(self, name: str) -> type[Node]:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(
                f"no node class {name!r} is registered ({len(self._nodes)} registered)"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def schema(self, name: str) -> NodeSchema:
        return self[name].schema

    def object_info(self, context: Any = None, name: str | None = None) -> dict[str, Any]:
        """ComfyUI's ``/object_info`` (all nodes) or ``/object_info/{name}`` JSON.

        ``context`` feeds computed choices (e.g. the files in the input folder)."""
        names = [name] if name is not None else list(self._nodes)
        return {n: self[n].schema.object_info(context) for n in names}
