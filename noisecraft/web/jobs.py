"""ComfyUI's jobs API shapes (``GET /api/jobs``, ``/api/jobs/{id}``), which the node editor's
queue and history panels read, built from noisecraft's job queue rows."""

from __future__ import annotations

from typing import Any

from noisecraft.server.jobqueue import Job

STATUS = {"pending": "pending", "running": "in_progress", "success": "completed",
          "error": "failed", "interrupted": "cancelled", "cancelled": "cancelled"}
KNOWN = frozenset(STATUS.values())


def parse_statuses(text: str | None) -> set[str]:
    """``"completed,failed"`` -> a set; every name must be one of ComfyUI's job states."""
    if not text:
        return set(KNOWN)
    wanted = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(wanted - KNOWN)
    if unknown:
        raise ValueError(f"unknown job status {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(KNOWN))}")
    return wanted


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def _images(job: Job) -> list[dict[str, Any]]:
    out = []
    for node_id, ui in ((job.result or {}).get("outputs") or {}).items():
        for image in ui.get("images", []) if isinstance(ui, dict) else []:
            out.append({**image, "nodeId": str(node_id), "mediaType": "images"})
    return out


def summary(job: Job) -> dict[str, Any]:
    images = _images(job)
    error = (job.result or {}).get("error") if job.status == "error" else None
    extra = job.payload.get("extra_data") or {}
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow") or {}
    return {
        "id": job.id,
        "status": STATUS.get(job.status, "failed"),
        "create_time": _ms(job.created),
        "execution_start_time": _ms(job.started),
        "execution_end_time": _ms(job.finished),
        "preview_output": images[-1] if images else None,
        "outputs_count": len(images),
        "previewable_outputs_count": len(images),
        "execution_error": None if not error else {
            "node_id": str(error.get("node_id") or ""), "node_type": str(error.get("node_type")
                                                                          or job.kind),
            "exception_message": str(error.get("message", "")),
            "exception_type": str(error.get("type", "")), "traceback": [],
        },
        "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None,
        "priority": job.number,
    }


def detail(job: Job) -> dict[str, Any]:
    extra = job.payload.get("extra_data") or {}
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow")
    return {**summary(job),
            "workflow": {"prompt": job.payload.get("prompt", {}),
                         "extra_data": {"extra_pnginfo": {"workflow": workflow}}},
            "outputs": (job.result or {}).get("outputs", {}),
            "update_time": _ms(job.finished or job.started or job.created)}


def listing(jobs: list[Job], statuses: set[str], limit: int, offset: int) -> dict[str, Any]:
    chosen = [j for j in jobs if STATUS.get(j.status, "failed") in statuses]
    chosen.sort(key=lambda j: j.created, reverse=True)
    page = chosen[offset:offset + limit]
    return {"jobs": [summary(j) for j in page],
            "pagination": {"offset": offset, "limit": limit, "total": len(chosen),
                           "has_more": offset + limit < len(chosen)}}
