"""Regional conditioning in the sampler's denoiser: masks, mask bounds, percentage areas with
faded edges, timestep ranges and the partner areas CFG needs, each checked against the single
entries' own x0 predictions combined by hand (ComfyUI's get_area_and_mult rules)."""

from __future__ import annotations

import math

import pytest
import torch

from noisecraft.conditioning import Conditioning
from noisecraft.engine import Engine
from noisecraft.graph.context import NodeContext
from noisecraft.models.family import get_family
from noisecraft.nodes.conditioning import encode_text
from noisecraft.nodes.guiders import guider_denoiser
from noisecraft.nodes.loaders import CheckpointLoaderSimple
from noisecraft.nodes.model_values import Guider, entry_cond
from noisecraft.nodes.regions import (
    mirror_areas,
    percent_to_sigma,
    region_of,
    resolve_entry,
)
from noisecraft.pipelines.common import Run, guided_denoiser
from tests.nodes.test_model_nodes_support import SD1_NAME, make_context, write_models

SCHEDULE = get_family("sd1").schedule()


def test_percent_to_sigma_and_entry_resolution():
    assert percent_to_sigma(SCHEDULE, 0.0) == math.inf and percent_to_sigma(SCHEDULE, 1.0) == 0
    assert percent_to_sigma(SCHEDULE, 0.25) == pytest.approx(
        float(SCHEDULE.t_to_sigma(torch.tensor(0.75 * 999))))
    pct = resolve_entry([None, {"area": ("percentage", 0.5, 0.26, 0.25, 0.5)}], 16, 10)
    assert pct[1]["area"] == (8, 3, 4, 5)  # h 0.5*16, w round(2.6), y 0.25*16, x 0.5*10
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:12, 8:10] = 1.0
    bounded = resolve_entry([None, {"mask": mask, "set_area_to_bounds": True}], 16, 16)
    assert bounded[1]["mask"].shape == (1, 16, 16)
    ys, xs = torch.nonzero(bounded[1]["mask"][0], as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())
    assert bounded[1]["area"] == (max(8, int(ys.max()) - y0 + 1), 8, y0, x0)  # at least 8
    empty = resolve_entry([None, {"mask": torch.zeros(4, 4), "set_area_to_bounds": True}], 8, 8)
    assert empty[1]["area"] == (8, 8, 0, 0)


def test_region_weights_fade_area_edges_inside_the_latent():
    region = region_of([None, {"area": (8, 8, 4, 0), "strength": 2.0}], 16, 16, SCHEDULE)
    assert region.box == (4, 0, 8, 8)
    rows = torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 0.5])  # r = min(8, 8 // 4) = 2; both inside
    cols = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.5])  # left side is on the border
    assert torch.allclose(region.weight[0, 0], 2.0 * rows[:, None] * cols[None, :])
    cut = region_of([None, {"area": (8, 8, 12, 12)}], 16, 16, SCHEDULE)
    assert cut.box == (12, 12, 4, 4) and region_of([None, {"area": (8, 8, 16, 0)}], 16, 16,
                                                    SCHEDULE) is None
    mask = torch.rand(1, 16, 16)
    masked = region_of([None, {"mask": mask, "mask_strength": 0.5, "strength": 3.0,
                               "area": (4, 4, 2, 2)}], 16, 16, SCHEDULE)
    assert torch.allclose(masked.weight[0, 0], 1.5 * mask[0, 2:6, 2:6])  # masks are not faded
    timed = region_of([None, {"start_percent": 0.2, "end_percent": 0.6}], 16, 16, SCHEDULE)
    assert timed.acts_at(percent_to_sigma(SCHEDULE, 0.4))
    assert not timed.acts_at(percent_to_sigma(SCHEDULE, 0.1))
    assert not timed.acts_at(percent_to_sigma(SCHEDULE, 0.7))


def test_mirror_areas_gives_each_area_a_partner_from_the_other_side():
    pos = [["P", {"pooled_output": "p"}], ["A", {"area": (4, 4, 0, 0), "strength": 2.0}]]
    neg = [["N", {"pooled_output": "n"}], ["M", {"area": (8, 8, 0, 0)}]]
    new_pos, new_neg = mirror_areas(pos, neg)
    # positive's area (4, 4, 0, 0): the smallest negative entry around it is M
    assert new_neg[2] == ["M", {"area": (4, 4, 0, 0), "strength": 2.0}]
    # negative's area (8, 8, 0, 0): positive's only enclosing entry is P (no area)
    assert new_pos[2] == ["P", {"pooled_output": "p", "area": (8, 8, 0, 0)}]
    assert len(new_pos) == 3 and len(new_neg) == 3 and len(pos) == 2


# ---- in the sampler's denoiser --------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(MODEL value, {name: CONDITIONING}) from the tiny SD1 checkpoint."""
    torch.set_num_threads(1)
    models = write_models(tmp_path_factory.mktemp("models"))
    execution = make_context(models, tmp_path_factory.mktemp("run"), Engine(device="cpu"))
    context = NodeContext(node_id="4", prompt_id="test", execution=execution,
                          emit=lambda *a, **k: None)
    model, clip, _ = CheckpointLoaderSimple.execute(SD1_NAME, context=context)
    texts = {"cat": "a cat", "dog": "a dog", "neg": "ugly"}
    return model, {k: encode_text(clip, t) for k, t in texts.items()}


def _alone(model, entry, shape, negative=False):
    """The x0 prediction of one entry by itself over a latent of ``shape``."""
    f = 2  # the tiny VAE's factor
    cond = entry_cond(model.bundle, entry, shape[-1] * f, shape[-2] * f, negative)
    return guided_denoiser(model.bundle, Conditioning(cond, cond), 1.0, 0.0, None, ())


def _denoiser(model, positive, negative=None, cfg=1.0, shape=(1, 4, 8, 8)):
    run = Run(model.bundle, torch.device("cpu"), [torch.Generator().manual_seed(0)])
    return guider_denoiser(Guider(model, positive, negative, cfg), run, torch.Size(shape))


def _with(cond, **opts):
    return [[cond[0][0], {**cond[0][1], **opts}]]


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3.0


SIGMA = torch.tensor([3.0])


@torch.no_grad()
def test_masks_weight_each_prompt_per_pixel(loaded):
    model, c = loaded
    m = torch.linspace(0, 1, 8).expand(1, 8, 8)
    pos = _with(c["cat"], mask=m, mask_strength=1.0) + _with(c["dog"], mask=1 - m,
                                                              mask_strength=0.5)
    x = _x((1, 4, 8, 8))
    got = _denoiser(model, pos)(x, SIGMA)
    a, b = _alone(model, c["cat"][0], x.shape)(x, SIGMA), _alone(model, c["dog"][0],
                                                                  x.shape)(x, SIGMA)
    w1, w2 = m[:, None], 0.5 * (1 - m[:, None])
    torch.testing.assert_close(got, (w1 * a + w2 * b) / (w1 + w2), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mask_bounds_run_the_prompt_on_the_box_only(loaded):
    model, c = loaded
    shape = (1, 4, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[0, 9:12, 10:13] = 1.0  # box at least 8x8 from (9, 10), cut at the latent's edge
    pos = _with(c["cat"], mask=mask, mask_strength=1.0, set_area_to_bounds=True) + c["dog"]
    x = _x(shape, 1)
    got = _denoiser(model, pos, shape=shape)(x, SIGMA)
    box = (..., slice(9, 16), slice(10, 16))
    a = _alone(model, c["cat"][0], shape)(x[box], SIGMA)
    b = _alone(model, c["dog"][0], shape)(x, SIGMA)
    expected = b.clone()
    w = mask[None, :, 9:16, 10:16]
    expected[box] = (w * a + b[box]) / (w + 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_percentage_area_fades_in_and_gets_a_cfg_partner(loaded):
    model, c = loaded
    shape = (1, 4, 16, 16)
    pos = c["dog"] + _with(c["cat"], area=("percentage", 0.5, 0.5, 0.25, 0.25), strength=2.0)
    x = _x(shape, 2)
    got = _denoiser(model, pos, c["neg"], 4.0, shape)(x, SIGMA)
    box = (..., slice(4, 12), slice(4, 12))
    ramp = torch.tensor([0.5, 1, 1, 1, 1, 1, 1, 0.5])
    w = 2.0 * ramp[:, None] * ramp[None, :]
    dog, cat = _alone(model, c["dog"][0], shape), _alone(model, c["cat"][0], shape)
    neg = _alone(model, c["neg"][0], shape, negative=True)
    x0_c, x0_u = dog(x, SIGMA), neg(x, SIGMA)
    x0_c[box] = (x0_c[box] + w * cat(x[box], SIGMA)) / (1 + w)
    # the negative side gets the same area, run with its own prompt on the crop
    x0_u[box] = (x0_u[box] + w * neg(x[box], SIGMA)) / (1 + w)
    torch.testing.assert_close(got, x0_u + 4.0 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_timestep_ranges_pick_the_prompt_by_sigma(loaded):
    model, c = loaded
    pos = _with(c["cat"], start_percent=0.0, end_percent=0.3) \
        + _with(c["dog"], start_percent=0.3, end_percent=1.0)
    denoise = _denoiser(model, pos)
    x = _x((1, 4, 8, 8), 3)
    boundary = percent_to_sigma(SCHEDULE, 0.3)
    high, low = torch.tensor([boundary * 1.5]), torch.tensor([boundary / 1.5])
    cat, dog = _alone(model, c["cat"][0], x.shape), _alone(model, c["dog"][0], x.shape)
    torch.testing.assert_close(denoise(x, high), cat(x, high), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoise(x, low), dog(x, low), rtol=1e-5, atol=1e-5)
    # no prompt acts past the end of a lone ranged prompt: the prediction is 0 (as ComfyUI)
    only = _denoiser(model, _with(c["cat"], start_percent=0.0, end_percent=0.3))
    assert only(x, low).abs().max() == 0
