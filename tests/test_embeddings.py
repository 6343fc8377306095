"""Textual-inversion embedding files, names in prompts, and the A1111 listing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.embeddings import (
    embedding_files,
    embedding_references,
    list_embeddings,
    load_embedding,
)
from noisecraft.models_folder import ModelFolders
from noisecraft.request import InputError


class Executable:
    """Pickling this needs code (a class outside torch's allowlist)."""


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "models"
    emb = root / "embeddings"
    (emb / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 768, generator=g)
    torch.save({"string_to_param": {"*": v}, "name": "bad-hands", "step": 1500},
               emb / "bad-hands.pt")
    save_file({"emb_params": torch.randn(3, 1024, generator=g)},
              str(emb / "sub" / "sd2.safetensors"))
    save_file({"clip_l": torch.randn(1, 768, generator=g),
               "clip_g": torch.randn(1, 1280, generator=g)}, str(emb / "xl.safetensors"))
    torch.save({"string_to_param": {"*": Executable()}}, emb / "evil.pt")
    return ModelFolders.at(root), v


def test_every_layout_loads_with_its_vectors(folder):
    folders, v = folder
    files = embedding_files(folders)
    assert sorted(files) == ["bad-hands", "evil", "sub/sd2", "xl"]
    a1111 = load_embedding(files["bad-hands"])
    assert a1111.name == "bad-hands" and a1111.step == 1500 and a1111.num_vectors == 2
    assert torch.equal(a1111.vectors_for(768), v)
    assert load_embedding(files["sub/sd2"]).vectors_for(1024).shape == (3, 1024)
    xl = load_embedding(files["xl"])
    assert xl.vectors_for(768, "clip_l").shape == (1, 768)
    assert xl.vectors_for(1280, "clip_g").shape == (1, 1280)


def test_wrong_width_and_pickled_code_are_refused_with_a_reason(folder):
    folders, _ = folder
    files = embedding_files(folders)
    with pytest.raises(InputError, match=r"takes 1024-wide token vectors, the embedding has "
                                         r"vectors 768.*SD 2.x: 1024"):
        load_embedding(files["bad-hands"]).vectors_for(1024)
    with pytest.raises(InputError, match="refused, loading it would run code"):
        load_embedding(files["evil"])
    listing = list_embeddings(folders)
    assert listing["loaded"]["bad-hands"] == {"step": 1500, "sd_checkpoint": None,
                                              "sd_checkpoint_name": None, "shape": 768,
                                              "vectors": 2}
    assert listing["loaded"]["xl"]["shape"] == 1280 and "evil" in listing["skipped"]


def test_references_in_comfyui_and_a1111_syntax():
    names = {"bad-hands", "sub/sd2", "xl"}
    prompt = "a cat, (embedding:bad-hands:1.2), embedding:sub/sd2.safetensors and xl style"
    refs = embedding_references(prompt, names)
    assert [(prompt[s:e], n) for s, e, n in refs] == [
        ("embedding:bad-hands", "bad-hands"), ("embedding:sub/sd2.safetensors", "sub/sd2"),
        ("xl", "xl")]
    assert embedding_references("xlarge, pixel", names) == []
    with pytest.raises(InputError, match="embedding 'nope', which is not in the embeddings "
                                         "folder; known: bad-hands, sub/sd2, xl"):
        embedding_references("embedding:nope", names)
