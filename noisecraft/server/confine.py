"""What an untrusted client's generation request may name: files in the server's own folders.

Used twice: when the HTTP layer validates a request (so a bad one is a 400 at once) and again
by the worker that runs it (a job may come from a queue the HTTP layer never saw)."""

from __future__ import annotations

from dataclasses import replace

from noisecraft.loras import confine_loras
from noisecraft.request import GenerationRequest, InputError


def confine_request(request: GenerationRequest, folders) -> GenerationRequest:
    """``request`` as an untrusted client may send it: LoRAs (entries and ``<lora:..>`` tags)
    must name files in the server's ``models/loras``, and textual-inversion embeddings
    (``embedding:name`` or A1111's bare names) are looked up in ``models/embeddings``; a
    client-chosen ``loras_dir`` or ``embeddings_dir`` is refused (it would let a client point
    the server at any folder)."""
    if request.embeddings_dir is not None:
        raise InputError("embeddings_dir cannot be chosen here; embeddings are looked up in "
                         f"{folders.models('embeddings')}")
    request = confine_loras(request, folders.models("loras"))
    embeddings = folders.models("embeddings")
    return replace(request, embeddings_dir=str(embeddings)) if embeddings.is_dir() else request
