"""The browser UI: static pages (``static/``, no build step) and where the node editor lives.

* :func:`static_dir`: the generation page (``/``), the learning view (``/learn``) and their
  scripts, served by ``noisecraft serve`` unless ``--web-dir`` names another folder.
* :func:`editor_dir`: the built ComfyUI editor shipped by the ``comfyui-frontend-package``
  (the ``web`` extra), served unmodified at ``/editor/``; None when it is not installed.

The pages carry no diffusion logic: they call the server's HTTP APIs and draw the answers.
"""

from __future__ import annotations

from pathlib import Path

EDITOR_PACKAGE = "comfyui-frontend-package"
EDITOR_MISSING = (
    f"the node editor needs the {EDITOR_PACKAGE} package, which is not installed; "
    "install it with: pip install 'noisecraft[web]'"
)


def static_dir() -> Path:
    """The folder of the web UI's own static files."""
    return Path(__file__).resolve().parent / "static"


def editor_dir() -> Path | None:
    """The built ComfyUI editor's folder (with its ``index.html``), or None if not installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    folder = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    return folder if (folder / "index.html").is_file() else None


def editor_extension_dir() -> Path:
    """noisecraft's own editor extensions (ComfyUI's ``/extensions`` mechanism)."""
    return static_dir() / "editor-ext"
