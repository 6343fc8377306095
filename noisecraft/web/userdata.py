"""The node editor's per-user files and settings, stored on disk as ComfyUI stores them.

Layout under the server's data folder (one user, ``default``, as ComfyUI without
``--multi-user``)::

    user/default/comfy.settings.json   the editor's settings (one JSON object)
    user/default/workflows/            saved workflows (*.json)
    user/default/...                   any other file the editor keeps (templates, css, ...)

Every path from a request goes through :func:`noisecraft.graph.safe_join`: nothing outside
``user/default`` can be read or written.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from noisecraft.graph import UnsafePathError, safe_join

SETTINGS_FILE = "comfy.settings.json"
USER = "default"
# Settings the editor gets until the user changes them: this server is offline, so the
# editor's check for new ComfyUI releases (a request to comfy.org) is off, and its first-run
# template browser (noisecraft ships no templates) is skipped for the default workflow.
SETTING_DEFAULTS = {"Comfy.Notification.ShowVersionUpdates": False,
                    "Comfy.TutorialCompleted": True}
STARTER_FILES = {"comfy.templates.json": "[]", "user.css": ""}


class UserDataError(ValueError):
    """A userdata request that cannot be served; ``status`` is the HTTP answer to give."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UserStore:
    """Settings and files of the editor's (single) user."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve() / "user" / USER
        self._lock = threading.Lock()

    def create(self) -> UserStore:
        for folder in ("workflows", "subgraphs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        for name, empty in STARTER_FILES.items():  # what the editor reads at start-up
            if not (self.root / name).exists():
                (self.root / name).write_text(empty, encoding="utf-8")
        return self

    # ---- settings -------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The stored settings over :data:`SETTING_DEFAULTS`."""
        return {**SETTING_DEFAULTS, **self.stored_settings()}

    def stored_settings(self) -> dict[str, Any]:
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            merged = {**self.stored_settings(), **values}
            self._write_atomic(self.root / SETTINGS_FILE,
                               json.dumps(merged, indent=2).encode("utf-8"))
            return merged

    # ---- files ----------------------------------------------------------------------------

    def path(self, relative: str, *, must_exist: bool = False) -> Path:
        if not relative or any(ord(ch) < 32 for ch in relative):
            raise UserDataError("a userdata path must be non-empty, without control characters")
        try:
            path = safe_join(self.root, relative, what="userdata path")
        except (UnsafePathError, ValueError) as e:
            raise UserDataError(str(e)) from None
        if must_exist and not path.is_file():
            raise UserDataError(f"no userdata file {relative!r}", status=404)
        return path

    def info(self, path: Path) -> dict[str, Any]:
        st = path.stat()
        return {"path": path.relative_to(self.root).as_posix(), "size": st.st_size,
                "modified": st.st_mtime}

    def list(self, directory: str, *, recurse: bool, full_info: bool,
             split: bool) -> list[Any]:
        """ComfyUI's ``GET /userdata?dir=``: files under ``directory``, paths relative to it."""
        folder = self.path(directory) if directory else self.root
        if not folder.is_dir():
            raise UserDataError(f"no userdata folder {directory!r}", status=404)
        files = sorted(folder.rglob("*") if recurse else folder.glob("*"))
        out: list[Any] = []
        for f in files:
            if not f.is_file():
                continue
            rel = f.relative_to(folder).as_posix()
            if full_info:
                out.append({**self.info(f), "path": rel})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return out

    def list_v2(self, directory: str) -> list[dict[str, Any]]:
        """ComfyUI's ``GET /v2/userdata?path=``: one level, files and folders."""
        folder = self.path(directory) if directory else self.root
        if not folder.is_dir():
            raise UserDataError(f"no userdata folder {directory!r}", status=404)
        out = []
        for f in sorted(folder.iterdir()):
            entry = {"name": f.name, "path": f.relative_to(self.root).as_posix(),
                     "type": "directory" if f.is_dir() else "file"}
            if f.is_file():
                st = f.stat()
                entry.update(size=st.st_size, modified=st.st_mtime)
            out.append(entry)
        return out

    def write(self, relative: str, data: bytes, *, overwrite: bool) -> Path:
        path = self.path(relative)
        if path.exists() and not overwrite:
            raise UserDataError(f"userdata file {relative!r} exists; pass overwrite=true "
                                "to replace it", status=409)
        with self._lock:
            self._write_atomic(path, data)
        return path

    def delete(self, relative: str) -> None:
        self.path(relative, must_exist=True).unlink()

    def move(self, source: str, dest: str, *, overwrite: bool) -> Path:
        src = self.path(source, must_exist=True)
        target = self.path(dest)
        if target.exists() and not overwrite:
            raise UserDataError(f"userdata file {dest!r} exists; pass overwrite=true to "
                                "replace it", status=409)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
        return target

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
