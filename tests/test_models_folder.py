"""The models folder: ComfyUI layout, extra_model_paths configs (ComfyUI and A1111 folders,
YAML and TOML), name listing and resolution, the default model, and the loader nodes' lists."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from noisecraft.graph import ExecutionContext, UnsafePathError
from noisecraft.models_folder import (
    DEFAULT_CHECKPOINT_NAME,
    MODEL_KINDS,
    ModelFolderError,
    ModelFolders,
    model_folders_of,
)
from noisecraft.nodes import builtin_registry


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_comfyui_layout_lists_model_files_and_diffusers_folders(tmp_path):
    folders = ModelFolders.at(tmp_path, default_model=None).create()
    assert all((tmp_path / kind).is_dir() for kind in MODEL_KINDS)
    _touch(tmp_path / "checkpoints" / "b.safetensors")
    _touch(tmp_path / "checkpoints" / "sub" / "a.ckpt")
    _touch(tmp_path / "checkpoints" / "notes.txt")
    _touch(tmp_path / "checkpoints" / ".hidden.safetensors")
    _touch(tmp_path / "checkpoints" / "pipe" / "model_index.json")
    _touch(tmp_path / "checkpoints" / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    _touch(tmp_path / "loras" / "style.safetensors")
    assert folders.names("checkpoints") == ["b.safetensors", "pipe", "sub/a.ckpt"]
    assert folders.names("loras") == ["style.safetensors"]
    assert folders.names("vae") == []
    assert folders.resolve("checkpoints", "sub/a.ckpt") == tmp_path / "checkpoints/sub/a.ckpt"
    assert folders.resolve("checkpoints", "pipe").is_dir()


def test_resolve_errors_teach_and_traversal_is_refused(tmp_path):
    folders = ModelFolders.at(tmp_path, default_model=None)
    _touch(tmp_path / "loras" / "one.safetensors")
    with pytest.raises(ModelFolderError, match=r"no loras model named 'two.safetensors'.*"
                                               r"available: one.safetensors"):
        folders.resolve("loras", "two.safetensors")
    with pytest.raises(UnsafePathError):
        folders.resolve("loras", "../checkpoints/x.safetensors")
    with pytest.raises(UnsafePathError):
        folders.resolve("loras", "/etc/passwd")
    with pytest.raises(ModelFolderError, match="unknown model kind 'lora'.*loras"):
        folders.names("lora")


def test_default_model_is_listed_only_when_its_weights_exist(tmp_path):
    weights = tmp_path / "weights" / "default.safetensors"
    folders = ModelFolders.at(tmp_path / "models", default_model=weights)
    assert DEFAULT_CHECKPOINT_NAME not in folders.names("checkpoints")
    with pytest.raises(ModelFolderError):
        folders.resolve("checkpoints", DEFAULT_CHECKPOINT_NAME)
    _touch(weights)
    assert folders.names("checkpoints") == [DEFAULT_CHECKPOINT_NAME]
    assert folders.resolve("checkpoints", DEFAULT_CHECKPOINT_NAME) == weights


def test_yaml_config_in_comfyuis_format(tmp_path):
    comfy, webui = tmp_path / "ComfyUI", tmp_path / "webui"
    _touch(comfy / "models" / "checkpoints" / "c.safetensors")
    _touch(webui / "models" / "Stable-diffusion" / "w.safetensors")
    _touch(webui / "models" / "Lora" / "l1.safetensors")
    _touch(webui / "models" / "LyCORIS" / "l2.safetensors")
    _touch(webui / "embeddings" / "e.pt")
    config = tmp_path / "conf" / "extra_model_paths.yaml"
    config.parent.mkdir()
    config.write_text(
        "comfyui:\n"
        f"    base_path: {comfy}\n"
        "    is_default: true\n"
        "    checkpoints: models/checkpoints/\n"
        "    clip: models/clip/\n"
        "a111:\n"
        "    base_path: ../webui\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "    embeddings: embeddings\n"
    )
    own = tmp_path / "own"
    _touch(own / "checkpoints" / "c.safetensors")  # same name: the own folder wins
    folders = ModelFolders.load(own, config, default_model=None)
    assert folders.names("checkpoints") == ["c.safetensors", "w.safetensors"]
    assert folders.resolve("checkpoints", "c.safetensors") == own / "checkpoints/c.safetensors"
    assert folders.resolve("checkpoints", "w.safetensors").parent.name == "Stable-diffusion"
    assert folders.names("loras") == ["l1.safetensors", "l2.safetensors"]
    assert folders.names("embeddings") == ["e.pt"]


def test_base_path_alone_detects_a1111_or_comfyui_layout_and_toml_works(tmp_path):
    webui, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    _touch(webui / "models" / "Stable-diffusion" / "w.safetensors")
    _touch(webui / "models" / "VAE" / "v.pt")
    _touch(comfy / "models" / "upscale_models" / "x4.pth")
    config = tmp_path / "paths.toml"
    config.write_text(f'[webui]\nbase_path = "{webui}"\n\n[comfy]\nbase_path = "{comfy}"\n'
                      'controlnet = ["models/controlnet", "more/cn"]\n')
    folders = ModelFolders.load(None, config, default_model=None)
    assert folders.names("checkpoints") == ["w.safetensors"]
    assert folders.names("vae") == ["v.pt"]
    assert folders.paths("controlnet")[-2:] == (comfy / "models/controlnet", comfy / "more/cn")
    assert folders.names("upscale_models") == []  # comfy gave explicit keys: only those


@pytest.mark.parametrize("text, match", [
    ("a111: [1, 2]\n", "section 'a111' must map"),
    ("a111:\n    loras: 3\n", "entry 'loras' must be a path"),
    ("- just\n- a list\n", "expected sections"),
    ("a111: {\n", "not valid YAML"),
])
def test_bad_configs_are_refused_with_a_reason(tmp_path, text, match):
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(text)
    with pytest.raises(ModelFolderError, match=match):
        ModelFolders.load(tmp_path, config)
    with pytest.raises(ModelFolderError, match="cannot read"):
        ModelFolders.load(tmp_path, tmp_path / "missing.yaml")


def test_context_lookup_and_loader_choice_lists(tmp_path):
    _touch(tmp_path / "data" / "models" / "checkpoints" / "m.safetensors")
    _touch(tmp_path / "data" / "models" / "loras" / "l.safetensors")
    server_like = ExecutionContext(resources={"folders": SimpleNamespace(root=tmp_path / "data")})
    assert model_folders_of(server_like).names("loras") == ["l.safetensors"]
    own = ModelFolders.at(tmp_path / "data" / "models", default_model=None)
    ctx = ExecutionContext(resources={"models": own})
    assert model_folders_of(SimpleNamespace(execution=ctx)) is own
    info = builtin_registry(models=True).object_info(ctx)
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == \
        ["m.safetensors"]
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == ["l.safetensors"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == []
    assert model_folders_of(ExecutionContext()).paths("checkpoints") == ()
