"""Textual-inversion embeddings in node graphs: a checkpoint's CLIP carries the models folders'
``embeddings`` folder, so ``embedding:name`` in CLIPTextEncode reads the file (as in ComfyUI),
and a file added later is seen by the next run of the same executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from noisecraft.engine import Engine
from noisecraft.graph import Executor, NodeExecutionError, run_workflow_result
from tests.nodes.test_model_nodes_support import (
    SD1_NAME,
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_models(tmp_path_factory.mktemp("models"))
    (root / "embeddings").mkdir()
    return root


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


def _save_token_embedding(models, engine, name: str, word: str) -> None:
    """An embedding file (``emb_params`` layout) whose one vector is ``word``'s token
    embedding in the test checkpoint's text encoder."""
    text = engine.model(models / "checkpoints" / SD1_NAME).text_encoder
    (token,) = text.tokenizer.encode(word)
    vector = text.text_model.embeddings.token_embedding.weight[token].detach().clone()
    save_file({"emb_params": vector[None].contiguous()}, str(models / "embeddings" /
                                                            f"{name}.safetensors"))


def _image(executor, context, text: str) -> np.ndarray:
    prompt = txt2img_prompt(seed=3, steps=2)
    prompt["6"]["inputs"]["text"] = text
    run = run_workflow_result(prompt, registry=executor.registry, context=context,
                              executor=executor)
    return to_uint8(run.values["8"][0])[0]


def test_clip_text_encode_reads_embeddings_from_the_models_folder(models, engine, tmp_path):
    executor = Executor(registry())
    context = make_context(models, tmp_path, engine)
    red = _image(executor, context, "a red cat")
    with pytest.raises(NodeExecutionError, match="embedding 'crimson'.*not in the embeddings"):
        _image(executor, context, "a embedding:crimson cat")
    _save_token_embedding(models, engine, "crimson", "red")  # added between two runs
    np.testing.assert_array_equal(_image(executor, context, "a embedding:crimson cat"), red)
    np.testing.assert_array_equal(_image(executor, context, "a (embedding:crimson:1.0) cat"),
                                  red)
    assert not np.array_equal(_image(executor, context, "a blue cat"), red)
