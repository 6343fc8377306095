"""MODEL -> MODEL nodes that change how a model samples, not its weights: ModelSamplingDiscrete
(prediction type and zero-terminal-SNR schedule) and RescaleCFG (guidance rescale).

Names, inputs, defaults, ranges and categories are ComfyUI's (``comfy_extras/
nodes_model_advanced.py``).  Each returns a new MODEL value sharing the U-Net; the one it was
given is left as it is.
"""

from __future__ import annotations

from dataclasses import replace

from noisecraft.graph.schema import BOOLEAN, COMBO, FLOAT, MODEL, Input, Node, NodeSchema, Output
from noisecraft.nodes.model_values import ModelValue

# ComfyUI's ModelSamplingDiscrete choices -> noisecraft's prediction types (diffusion.py)
PREDICTIONS = {"eps": "eps", "v_prediction": "v", "x0": "x0"}
UNSUPPORTED_SAMPLING = {
    "lcm": "LCM's sampling uses a distilled 50-timestep sigma table and the consistency "
           "boundary scalings (c_skip, c_out), which noisecraft's denoiser does not have",
    "img_to_img": "it gives image-to-image models (e.g. Lotus) their input without the "
                  "1 / sqrt(1 + sigma^2) scaling, which noisecraft's denoiser does not do",
    "img_to_img_flow": "it is a flow-matching parameterisation; noisecraft's denoiser has eps, "
                       "v and x0 predictions on a discrete variance-preserving schedule only",
}


def _sampling_problem(sampling: str) -> str | None:
    if sampling in PREDICTIONS:
        return None
    allowed = ", ".join(PREDICTIONS)
    why = UNSUPPORTED_SAMPLING.get(sampling)
    if why is not None:
        return f"sampling {sampling!r} is not supported: {why}; choose one of: {allowed}"
    return f"unknown sampling {sampling!r}; choose one of: {allowed}"


class ModelSamplingDiscrete(Node):
    schema = NodeSchema(
        name="ModelSamplingDiscrete", category="advanced/model",
        inputs=[Input("model", MODEL),
                Input("sampling", COMBO, choices=list(PREDICTIONS), check_choices=False),
                Input("zsnr", BOOLEAN, default=False)],
        outputs=[Output(MODEL)],
    )

    @classmethod
    def validate_inputs(cls, context=None, **inputs):
        problem = _sampling_problem(inputs.get("sampling"))
        return {"sampling": problem} if problem else {}

    @classmethod
    def execute(cls, model: ModelValue, sampling: str, zsnr: bool):
        """The model with its family's prediction type set to ``sampling`` (eps, v_prediction
        or x0) and its training schedule rescaled to zero terminal SNR when ``zsnr`` (Lin et
        al. 2023, Alg. 1), else the family's plain schedule, whatever the file said - as
        ComfyUI rebuilds the model's sampling from these two settings.

        ComfyUI gives the last timestep of a zsnr schedule alpha_bar = 4.897e-8 (sigma_max
        ~ 4519); noisecraft's families use diffusers' 2**-24 (sigma_max = 4096), so the
        first step of a zsnr run starts from a slightly lower noise level than ComfyUI's.
        ComfyUI's ``lcm`` and ``img_to_img`` choices are refused (see UNSUPPORTED_SAMPLING).
        """
        problem = _sampling_problem(sampling)
        if problem:
            raise ValueError(f"ModelSamplingDiscrete: {problem}")
        bundle = model.bundle
        family = bundle.family.with_overrides(prediction=PREDICTIONS[sampling],
                                              zero_terminal_snr=bool(zsnr))
        return (replace(model, bundle=replace(bundle, family=family,
                                              extras=dict(bundle.extras))),)


class RescaleCFG(Node):
    schema = NodeSchema(
        name="RescaleCFG", category="advanced/model",
        inputs=[Input("model", MODEL),
                Input("multiplier", FLOAT, default=0.7, min=0.0, max=1.0, step=0.01)],
        outputs=[Output(MODEL)],
    )

    @classmethod
    def execute(cls, model: ModelValue, multiplier: float):
        """The model with guidance rescale ``multiplier`` for every sampler and guider that
        uses it (KSampler, CFGGuider, ...), computed as ComfyUI does: on v predictions
        (:func:`noisecraft.nodes.guiders.comfy_rescaled_cfg`, whose docstring says how that
        differs from the engine's ``guidance_rescale``, which works on eps).  A later
        RescaleCFG replaces an earlier one's multiplier; 0 is plain CFG."""
        if not 0.0 <= float(multiplier) <= 1.0:
            raise ValueError(f"RescaleCFG: multiplier must lie in [0, 1], got {multiplier}")
        return (replace(model, cfg_rescale=float(multiplier)),)


MODEL_PATCH_NODES = [ModelSamplingDiscrete, RescaleCFG]
