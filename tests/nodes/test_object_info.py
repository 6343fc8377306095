"""/object_info entries compared with ComfyUI's published shapes for the same nodes."""

from noisecraft.graph import ExecutionContext
from noisecraft.nodes import builtin_registry

REGISTRY = builtin_registry()


def test_empty_latent_image_matches_comfyui():
    info = REGISTRY.object_info(name="EmptyLatentImage")["EmptyLatentImage"]
    width = info["input"]["required"]["width"]
    assert width[0] == "INT"
    assert {k: width[1][k] for k in ("default", "min", "max", "step")} == {
        "default": 512, "min": 16, "max": 16384, "step": 8}
    assert info["input"]["required"]["batch_size"][1]["max"] == 4096
    assert info["output"] == ["LATENT"] and info["output_is_list"] == [False]
    assert info["output_name"] == ["LATENT"] and info["name"] == "EmptyLatentImage"
    assert info["display_name"] == "Empty Latent Image" and info["category"] == "latent"
    assert info["output_node"] is False and isinstance(info["description"], str)
    assert info["input_order"] == {"required": ["width", "height", "batch_size"]}


def test_combo_split_sigmas_and_output_nodes():
    info = REGISTRY.object_info()
    assert info["LatentUpscale"]["input"]["required"]["crop"] == [["disabled", "center"]]
    assert info["ImageScale"]["input"]["required"]["upscale_method"][0] == [
        "nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    assert info["SplitSigmas"]["output"] == ["SIGMAS", "SIGMAS"]
    assert info["SplitSigmas"]["output_name"] == ["high_sigmas", "low_sigmas"]
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["output"] == []
    assert info["SaveImage"]["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert info["KarrasScheduler"]["input"]["required"]["sigma_max"][1] == {
        "default": 14.614642, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
    grow = info["GrowMask"]["input"]["required"]
    assert grow["expand"][1]["min"] == -16384 and grow["tapered_corners"] == [
        "BOOLEAN", {"default": True}]
    assert info["RandomNoise"]["input"]["required"]["noise_seed"][1]["max"] == 2**64 - 1


def test_choices_computed_from_the_context(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    info = REGISTRY.object_info(ExecutionContext(input_dir=tmp_path), name="LoadImage")
    image = info["LoadImage"]["input"]["required"]["image"]
    assert image == [["b.png", "sub/a.png"], {"image_upload": True}]
    assert info["LoadImage"]["output"] == ["IMAGE", "MASK"]
