"""Loader nodes: checkpoints, VAEs and LoRAs by name from the models folders, CLIP layer.

A checkpoint's CLIP carries the models folders' textual-inversion embeddings, so
``CLIPTextEncode`` reads ``embedding:name`` (and, as the engine does, the bare file name).

Names come from :func:`noisecraft.models_folder.model_folders_of` (the run's
``resources["models"]``, or the server's folders); the checkpoints themselves come from the
engine's model cache (``resources["engine"]``), so a checkpoint loads once per engine.  VAE
values hold the engine's backend-wrapped VAE (``Engine.runnable_vae``), so VAE nodes decode as
``generate_image`` does; MODEL values hold the plain model (LoRA nodes copy it), wrapped when
it samples.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from noisecraft.embeddings import PromptEmbeddings, embedding_files
from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import (
    CLIP,
    COMBO,
    FLOAT,
    INT,
    MODEL,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.models_folder import ModelFolderError, model_folders_of
from noisecraft.nodes.model_values import ClipValue, ModelValue, VaeValue, engine_of, with_loras


def _names(kind: str):
    def choices(context) -> list[str]:
        return model_folders_of(context).names(kind)

    return choices


def _stat(context, kind: str, name: str):
    """Changes when the named file changes on disk (so a replaced file is re-read)."""
    try:
        path = model_folders_of(context).resolve(kind, name)
    except ModelFolderError:
        return None
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def folder_embeddings(context) -> PromptEmbeddings:
    """The embeddings in the models folders' ``embeddings`` folder, loaded when a prompt names
    one; ``embedding:name`` of a file that is not there is an error listing those that are
    (ComfyUI warns and drops the word)."""
    return PromptEmbeddings.from_folders(model_folders_of(context))


class CheckpointLoaderSimple(Node):
    schema = NodeSchema(
        name="CheckpointLoaderSimple", display_name="Load Checkpoint", category="loaders",
        description="Loads a diffusion model checkpoint; diffusion models are used to denoise "
                    "latents.", needs_context=True,
        inputs=[Input("ckpt_name", COMBO, choices=_names("checkpoints"),
                      tooltip="The name of the checkpoint (model) to load.")],
        outputs=[Output(MODEL, tooltip="The model used for denoising latents."),
                 Output(CLIP, tooltip="The CLIP model used for encoding text prompts."),
                 Output(VAE, tooltip="The VAE model used for encoding and decoding images to "
                                     "and from latent space.")],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        """The checkpoint file and the embedding files its CLIP carries."""
        try:
            files = embedding_files(model_folders_of(context))
        except ModelFolderError:
            files = {}
        embeddings = tuple((n, p.stat().st_size, p.stat().st_mtime_ns)
                           for n, p in sorted(files.items()))
        return (_stat(context, "checkpoints", inputs.get("ckpt_name", "")), embeddings)

    @classmethod
    def execute(cls, ckpt_name, context: NodeContext):
        path = model_folders_of(context).resolve("checkpoints", ckpt_name)
        engine = engine_of(context)
        bundle = engine.model(path)
        return (ModelValue(bundle), ClipValue(bundle, embeddings=folder_embeddings(context)),
                VaeValue.of(engine.runnable_vae(bundle.vae), bundle.name, bundle.sha256))


class VAELoader(Node):
    schema = NodeSchema(
        name="VAELoader", display_name="Load VAE", category="loaders", needs_context=True,
        inputs=[Input("vae_name", COMBO, choices=_names("vae"))],
        outputs=[Output(VAE)],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        return _stat(context, "vae", inputs.get("vae_name", ""))

    @classmethod
    def execute(cls, vae_name, context: NodeContext):
        from noisecraft.checkpoints.loader import load_vae

        engine = engine_of(context)
        path = model_folders_of(context).resolve("vae", vae_name)
        vae = load_vae(path, device=engine.device, dtype=engine.dtype).eval()
        return (VaeValue.of(engine.runnable_vae(vae.requires_grad_(False)),
                            Path(vae_name).stem),)


_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def _lora_path(context, name: str) -> str:
    return str(model_folders_of(context).resolve("loras", name))


class LoraLoader(Node):
    schema = NodeSchema(
        name="LoraLoader", display_name="Load LoRA", category="loaders", needs_context=True,
        description="LoRAs modify diffusion and CLIP models, altering the way latents are "
                    "denoised (e.g. applying styles).  Several can be chained.",
        inputs=[
            Input("model", MODEL, tooltip="The diffusion model the LoRA will be applied to."),
            Input("clip", CLIP, tooltip="The CLIP model the LoRA will be applied to."),
            Input("lora_name", COMBO, choices=_names("loras"),
                  tooltip="The name of the LoRA."),
            Input("strength_model", FLOAT, **_STRENGTH,
                  tooltip="How strongly to modify the diffusion model (may be negative)."),
            Input("strength_clip", FLOAT, **_STRENGTH,
                  tooltip="How strongly to modify the CLIP model (may be negative)."),
        ],
        outputs=[Output(MODEL, tooltip="The modified diffusion model."),
                 Output(CLIP, tooltip="The modified CLIP model.")],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        return _stat(context, "loras", inputs.get("lora_name", ""))

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip,
                context: NodeContext):
        path = _lora_path(context, lora_name)
        if strength_model != 0:
            model = replace(model, bundle=with_loras(model.bundle, [(path, strength_model)],
                                                     "unet"),
                            loras=(*model.loras, (lora_name, strength_model)))
        if strength_clip != 0:
            clip = replace(clip, bundle=with_loras(clip.bundle, [(path, strength_clip)],
                                                   "text_encoder"),
                           loras=(*clip.loras, (lora_name, strength_clip)))
        return (model, clip)


class LoraLoaderModelOnly(Node):
    schema = NodeSchema(
        name="LoraLoaderModelOnly", display_name="LoraLoaderModelOnly", category="loaders",
        needs_context=True,
        inputs=[Input("model", MODEL), Input("lora_name", COMBO, choices=_names("loras")),
                Input("strength_model", FLOAT, **_STRENGTH)],
        outputs=[Output(MODEL)],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        return _stat(context, "loras", inputs.get("lora_name", ""))

    @classmethod
    def execute(cls, model, lora_name, strength_model, context: NodeContext):
        if strength_model == 0:
            return (model,)
        path = _lora_path(context, lora_name)
        return (replace(model, bundle=with_loras(model.bundle, [(path, strength_model)], "unet"),
                        loras=(*model.loras, (lora_name, strength_model))),)


class CLIPSetLastLayer(Node):
    schema = NodeSchema(
        name="CLIPSetLastLayer", display_name="CLIP Set Last Layer", category="conditioning",
        inputs=[Input("clip", CLIP),
                Input("stop_at_clip_layer", INT, default=-1, min=-24, max=-1, step=1)],
        outputs=[Output(CLIP)],
    )

    @classmethod
    def execute(cls, clip, stop_at_clip_layer):
        """-1 = the last layer (clip_skip 1), -2 = the penultimate (A1111's "clip skip 2")."""
        return (replace(clip, clip_skip=-stop_at_clip_layer),)


LOADER_NODES = [CheckpointLoaderSimple, VAELoader, LoraLoader, LoraLoaderModelOnly,
                CLIPSetLastLayer]
