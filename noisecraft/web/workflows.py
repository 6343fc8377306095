"""The node editor's default workflow: ComfyUI's txt2img graph (UI format, as the editor saves
it) pointing at a checkpoint this server has, at a size the model handles."""

from __future__ import annotations

from typing import Any


def _node(id_: int, type_: str, pos: tuple[int, int], inputs: list, outputs: list,
          widgets: list, title: str | None = None) -> dict[str, Any]:
    node = {"id": id_, "type": type_, "pos": list(pos), "size": [315, 120], "flags": {},
            "order": id_, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
    if title:
        node["title"] = title
    return node


def _in(name: str, type_: str, link: int) -> dict[str, Any]:
    return {"name": name, "type": type_, "link": link}


def _out(name: str, type_: str, links: list[int], slot: int) -> dict[str, Any]:
    return {"name": name, "type": type_, "links": links, "slot_index": slot}


def txt2img_workflow(checkpoint: str, prompt: str = "a red circle on a blue background",
                     negative: str = "blurry", size: int = 512, steps: int = 20,
                     seed: int = 0) -> dict[str, Any]:
    """Checkpoint -> two CLIPTextEncode -> KSampler on an empty latent -> VAEDecode ->
    SaveImage, with ComfyUI's node ids (4, 6, 7, 5, 3, 8, 9)."""
    nodes = [
        _node(4, "CheckpointLoaderSimple", (26, 474), [],
              [_out("MODEL", "MODEL", [1], 0), _out("CLIP", "CLIP", [3, 5], 1),
               _out("VAE", "VAE", [8], 2)], [checkpoint]),
        _node(6, "CLIPTextEncode", (415, 186), [_in("clip", "CLIP", 3)],
              [_out("CONDITIONING", "CONDITIONING", [4], 0)], [prompt], "Positive prompt"),
        _node(7, "CLIPTextEncode", (413, 389), [_in("clip", "CLIP", 5)],
              [_out("CONDITIONING", "CONDITIONING", [6], 0)], [negative], "Negative prompt"),
        _node(5, "EmptyLatentImage", (473, 609), [],
              [_out("LATENT", "LATENT", [2], 0)], [size, size, 1]),
        _node(3, "KSampler", (863, 186),
              [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
               _in("negative", "CONDITIONING", 6), _in("latent_image", "LATENT", 2)],
              [_out("LATENT", "LATENT", [7], 0)],
              [seed, "fixed", steps, 7.0, "euler", "normal", 1.0]),
        _node(8, "VAEDecode", (1209, 188),
              [_in("samples", "LATENT", 7), _in("vae", "VAE", 8)],
              [_out("IMAGE", "IMAGE", [9], 0)], []),
        _node(9, "SaveImage", (1451, 189), [_in("images", "IMAGE", 9)], [], ["noisecraft"]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"],
             [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"],
             [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]
    return {"last_node_id": 9, "last_link_id": 9, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"noisecraft_default": True}, "version": 0.4}
