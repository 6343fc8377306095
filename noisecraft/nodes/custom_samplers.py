"""SAMPLER nodes with options: ComfyUI's SamplerEulerAncestral, SamplerDPMPP_2M_SDE, ... give
a noisecraft sampler (:mod:`noisecraft.samplers`) and the keyword options it is run with.

Names, inputs, defaults, ranges and categories are ComfyUI's (``comfy_extras/
nodes_custom_sampler.py``).  ``noise_device`` picks where ComfyUI builds the SDE samplers'
Brownian tree; noisecraft always builds it on the CPU, as ComfyUI's "cpu" choice does, so both
choices give that noise here (on a CPU-only machine ComfyUI's "gpu" choice agrees with it too).
"""

from __future__ import annotations

from noisecraft.graph.schema import COMBO, FLOAT, INT, SAMPLER, Input, Node, NodeSchema, Output
from noisecraft.nodes.sampling import SamplerChoice

CATEGORY = "sampling/custom_sampling/samplers"
_OPTION = {"min": 0.0, "max": 100.0, "step": 0.01, "round": False}
NOISE_DEVICES = ["gpu", "cpu"]


def _eta(default: float = 1.0, **overrides) -> Input:
    return Input("eta", FLOAT, default=default, **{**_OPTION, **overrides})


def _s_noise(**overrides) -> Input:
    return Input("s_noise", FLOAT, default=1.0, **{**_OPTION, **overrides})


def _node(name: str, sampler: str, inputs: list[Input], doc: str) -> type[Node]:
    """A node returning ``SamplerChoice(sampler, {its inputs except noise_device})``."""

    def execute(cls, **options):
        options.pop("noise_device", None)
        return (SamplerChoice(sampler, options),)

    schema = NodeSchema(name=name, category=CATEGORY, inputs=inputs, outputs=[Output(SAMPLER)])
    return type(name, (Node,), {"schema": schema, "execute": classmethod(execute),
                                "__doc__": doc, "__module__": __name__})


SamplerEulerAncestral = _node(
    "SamplerEulerAncestral", "euler_ancestral", [_eta(), _s_noise()],
    "Euler ancestral: eta scales the noise re-added each step, s_noise its size.")
SamplerEulerAncestralCFGPP = _node(
    "SamplerEulerAncestralCFGPP", "euler_ancestral_cfg_pp",
    [_eta(max=1.0), _s_noise(max=10.0)], "Euler ancestral with CFG++ guidance.")
SamplerDPMPP_2S_Ancestral = _node(
    "SamplerDPMPP_2S_Ancestral", "dpmpp_2s_ancestral", [_eta(), _s_noise()],
    "DPM-Solver++(2S) ancestral.")
SamplerDPMPP_SDE = _node(
    "SamplerDPMPP_SDE", "dpmpp_sde",
    [_eta(), _s_noise(), Input("r", FLOAT, default=0.5, **_OPTION),
     Input("noise_device", COMBO, choices=NOISE_DEVICES)],
    "DPM-Solver++ SDE; r places the intermediate point as a fraction of each step.")
SamplerDPMPP_2M_SDE = _node(
    "SamplerDPMPP_2M_SDE", "dpmpp_2m_sde",
    [Input("solver_type", COMBO, choices=["midpoint", "heun"]), _eta(), _s_noise(),
     Input("noise_device", COMBO, choices=NOISE_DEVICES)],
    "DPM-Solver++(2M) SDE with the midpoint or Heun second-order correction.")
SamplerDPMPP_3M_SDE = _node(
    "SamplerDPMPP_3M_SDE", "dpmpp_3m_sde",
    [_eta(), _s_noise(), Input("noise_device", COMBO, choices=NOISE_DEVICES)],
    "DPM-Solver++(3M) SDE.")
SamplerLMS = _node(
    "SamplerLMS", "lms", [Input("order", INT, default=4, min=1, max=100)],
    "Linear multistep of the given order.")

CUSTOM_SAMPLER_NODES = [SamplerEulerAncestral, SamplerEulerAncestralCFGPP,
                        SamplerDPMPP_2S_Ancestral, SamplerDPMPP_SDE, SamplerDPMPP_2M_SDE,
                        SamplerDPMPP_3M_SDE, SamplerLMS]
