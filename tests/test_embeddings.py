"""Textual-inversion embedding files, names in prompts, and the A1111 listing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from noisecraft.api import generate_image
from noisecraft.conditioning import encode_conditioning
from noisecraft.embeddings import (
    Embedding,
    PromptEmbeddings,
    embedding_files,
    embedding_references,
    list_embeddings,
    load_embedding,
)
from noisecraft.engine import Engine
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.models_folder import ModelFolders
from noisecraft.prompts import tokenize_weighted
from noisecraft.request import InputError
from tests.fixtures.checkpoints import write_single_file


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


# ---- embeddings reach the text encoder ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt")
    return {f: write_single_file(root / f"{f}.safetensors", f) for f in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


def _token_vector(encoder, word: str) -> torch.Tensor:
    """The input embedding of ``word`` (one CLIP token) in ``encoder``."""
    (token,) = encoder.tokenizer.encode(word)
    return encoder.text_model.embeddings.token_embedding.weight[token].detach().clone()


def _cond(bundle, prompt: str, embeddings=None):
    return encode_conditioning(bundle, prompt, "blurry", width=16, height=16,
                               embeddings=embeddings)


def _assert_same(a, b):
    for side in ("cond", "uncond"):
        x, y = getattr(a, side), getattr(b, side)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6)


def test_embedding_equal_to_a_token_gives_that_tokens_conditioning(tiny_models, engine):
    bundle = engine.model(tiny_models["sd1"])
    red = _token_vector(bundle.text_encoder, "red")
    embs = PromptEmbeddings({"crimson": Embedding("crimson", {"": red[None]})})
    for plain, with_emb in (("a red cat", "a embedding:crimson cat"),
                            ("a (red:1.3) cat", "a (embedding:crimson:1.3) cat"),
                            ("a red cat", "a crimson cat")):  # A1111: the bare name
        _assert_same(_cond(bundle, with_emb, embs), _cond(bundle, plain))
    other = _cond(bundle, "a blue cat").cond["context"]
    assert (other - _cond(bundle, "a red cat").cond["context"]).abs().max() > 1e-3


def test_sdxl_embedding_reaches_both_encoders(tiny_models, engine):
    bundle = engine.model(tiny_models["sdxl"])
    clip_l, clip_g = bundle.text_encoder.embedders
    emb = Embedding("xl", {"clip_l": _token_vector(clip_l, "red")[None],
                           "clip_g": _token_vector(clip_g, "red")[None]})
    _assert_same(_cond(bundle, "a embedding:xl cat", PromptEmbeddings({"xl": emb})),
                 _cond(bundle, "a red cat"))
    # the vectors go to their own encoder: swapping them changes the conditioning
    swapped = Embedding("xl", {"clip_l": emb.vectors["clip_g"], "clip_g": emb.vectors["clip_l"]})
    got = _cond(bundle, "a embedding:xl cat", PromptEmbeddings({"xl": swapped}))
    assert (got.cond["context"] - _cond(bundle, "a red cat").cond["context"]).abs().max() > 1e-3


def test_embedding_gives_the_same_image_as_its_token(tiny_models, engine, tmp_path):
    bundle = engine.model(tiny_models["sd1"])
    red = _token_vector(bundle.text_encoder, "red")
    save_file({"emb_params": red[None].contiguous()}, str(tmp_path / "crimson.safetensors"))
    settings = dict(model=str(tiny_models["sd1"]), steps=2, seed=7, width=16, height=16,
                    engine=engine)
    token = np.asarray(generate_image("a red cat", **settings))
    emb = generate_image("a embedding:crimson cat", embeddings_dir=tmp_path, **settings)
    np.testing.assert_array_equal(np.asarray(emb), token)
    assert not np.array_equal(np.asarray(generate_image("a blue cat", **settings)), token)


def test_wrong_width_in_a_prompt_is_a_clear_error(tiny_models, engine, tmp_path):
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "sd15-style.safetensors"))
    with pytest.raises(InputError, match=r"embedding 'sd15-style' .*takes \d+-wide token "
                                         r"vectors, the embedding has vectors 768"):
        generate_image("embedding:sd15-style, a cat", model=str(tiny_models["sd1"]), steps=1,
                       width=16, height=16, engine=engine, embeddings_dir=tmp_path)
    with pytest.raises(InputError, match="embeddings folder .*missing does not exist"):
        generate_image("a cat", model=str(tiny_models["sd1"]), steps=1, width=16, height=16,
                       engine=engine, embeddings_dir=tmp_path / "missing")


def test_embedding_positions_and_chunk_boundary():
    tokenizer = CLIPTokenizer()
    vec = (0.5,) * 4
    embs = PromptEmbeddings({"three": Embedding("three", {"": torch.full((3, 4), 0.5)})})
    (chunk,) = tokenize_weighted("a (embedding:three:1.5) cat", tokenizer,
                                 embeddings=embs.splitter(4))
    assert chunk.vectors == ((2, vec), (3, vec), (4, vec))
    assert chunk.weights[1:6] == (1.0, 1.5, 1.5, 1.5, 1.0)
    # 73 words then a 3-vector embedding: it does not fit the 75 slots, so it starts chunk 2
    chunks = tokenize_weighted("cat " * 73 + "embedding:three", tokenizer, comma_backtrack=0,
                               embeddings=embs.splitter(4))
    assert len(chunks) == 2 and chunks[0].vectors == ()
    assert chunks[1].vectors == ((1, vec), (2, vec), (3, vec))
