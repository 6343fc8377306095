"""What a run gives its nodes: folders, the cancel token, progress reporting, resources.

Nothing here is global: the caller builds an :class:`ExecutionContext` (folders and the
objects that own expensive things, e.g. an ``Engine`` under ``resources["engine"]``) and the
executor hands each node a :class:`NodeContext` bound to that node.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from noisecraft.request import CancelToken

EventCallback = Callable[[str, dict[str, Any]], None]

FOLDER_TYPES = ("input", "output", "temp")


class ExecutionInterrupted(RuntimeError):
    """A run was cancelled through its :class:`~noisecraft.request.CancelToken`."""

    def __init__(self, node_id: str | None = None):
        where = f" at node {node_id}" if node_id is not None else ""
        super().__init__(f"execution interrupted{where}")
        self.node_id = node_id


class UnsafePathError(ValueError):
    """A file name from a workflow tried to leave its folder."""


def safe_join(root: str | os.PathLike, relative: str, what: str = "file name") -> Path:
    """``root / relative`` for a name taken from a workflow; refuses absolute paths, drive
    letters, ``..`` components and anything resolving outside ``root``."""
    text = str(relative).replace("\\", "/")
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(
            f"{what} {relative!r} must be a relative path inside {root} (no absolute paths)"
        )
    if ".." in parts:
        raise UnsafePathError(f"{what} {relative!r} must not contain '..' (it must stay in {root})")
    base = Path(root).resolve()
    path = (base / Path(*parts)).resolve()
    if path != base and base not in path.parents:
        raise UnsafePathError(f"{what} {relative!r} resolves outside {root}")
    return path


@dataclass
class ExecutionContext:
    """Folders and shared objects for one or many runs.  ``resources`` is where model-owning
    objects live (e.g. ``{"engine": engine}``); nodes look them up by name."""

    input_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    resources: dict[str, Any] = field(default_factory=dict)

    def folder(self, kind: str) -> Path:
        if kind not in FOLDER_TYPES:
            raise ValueError(
                f"unknown folder type {kind!r}; choose one of: {', '.join(FOLDER_TYPES)}"
            )
        path = {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}[kind]
        if kind == "temp" and path is None and self.output_dir is not None:
            path = Path(self.output_dir) / "temp"
        if path is None:
            raise ValueError(
                f"this execution context has no {kind} folder; pass {kind}_dir= to ExecutionContext"
            )
        return Path(path)

    def resource(self, name: str) -> Any:
        try:
            return self.resources[name]
        except KeyError:
            raise LookupError(
                f"this execution context has no resource {name!r} "
                f"(it has: {', '.join(self.resources) or 'none'}); put it in "
                f"ExecutionContext(resources={{{name!r}: ...}})"
            ) from None


@dataclass
class NodeContext:
    """A node's view of the run: its id, the shared context, cancel checks and progress."""

    node_id: str
    prompt_id: str
    execution: ExecutionContext
    emit: EventCallback
    prompt: dict[str, Any] = field(default_factory=dict)  # the API prompt being run
    extra_pnginfo: Mapping[str, Any] | None = None  # e.g. {"workflow": ui_format_json}

    @property
    def cancel(self) -> CancelToken:
        return self.execution.cancel

    def check_interrupted(self) -> None:
        """Raise :class:`ExecutionInterrupted` if the run was cancelled (call between steps)."""
        if self.execution.cancel.cancelled:
            raise ExecutionInterrupted(self.node_id)

    def progress(self, value: int, max: int, preview: Any = None) -> None:
        """Report progress (e.g. a sampler step) and optionally a preview image."""
        data: dict[str, Any] = {
            "value": value, "max": max, "node": self.node_id, "prompt_id": self.prompt_id,
        }
        if preview is not None:
            data["preview"] = preview
        self.emit("progress", data)

    def folder(self, kind: str) -> Path:
        return self.execution.folder(kind)

    def path_in(self, kind: str, relative: str) -> Path:
        """A file inside the input/output/temp folder; traversal is refused."""
        return safe_join(self.folder(kind), relative, what=f"{kind} file name")
