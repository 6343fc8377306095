import numpy as np
import pytest

from noisecraft.training.shapes import (
    POSITIONS,
    SIZE_FRACTION,
    TEMPLATES,
    PartialSpec,
    ShapesDataset,
    ShapeSpec,
    heldout_combinations,
    heldout_prompts,
    heldout_specs,
    is_heldout,
    parse_caption,
    render,
    sample_spec,
)


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    a = ShapesDataset(50, size=64, seed=3)
    b = ShapesDataset(1000, size=64, seed=3)
    for i in (7, 0, 49, 7):
        x, y = a[i], b[i]
        assert x.caption == y.caption and x.spec == y.spec
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))


def test_different_seeds_give_different_samples():
    a = [ShapesDataset(20, seed=0).spec(i) for i in range(20)]
    b = [ShapesDataset(20, seed=1).spec(i) for i in range(20)]
    assert a != b


def test_index_out_of_range_is_an_index_error():
    ds = ShapesDataset(3)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    assert ds[-1].spec == ds[2].spec


@pytest.mark.parametrize("size", [64, 128, 256])
def test_render_size_and_colours(size):
    spec = ShapeSpec("red", "square", "large", "center", "blue")
    image = render(spec, size)
    assert image.size == (size, size) and image.mode == "RGB"
    a = np.asarray(image)
    assert tuple(a[size // 2, size // 2]) == (205, 25, 25)
    assert tuple(a[0, 0]) == (30, 70, 225)
    # the square covers SIZE_FRACTION of the side, give or take the anti-aliased edge
    covered = (np.abs(a.astype(int) - (205, 25, 25)).sum(axis=2) < 100).sum()
    assert covered == pytest.approx((SIZE_FRACTION["large"] * size) ** 2, rel=0.1)


def test_render_is_anti_aliased():
    a = np.asarray(render(ShapeSpec("white", "circle", "large", "center", "black"), 128))
    levels = np.unique(a[..., 0])
    assert len(levels) > 10  # edge pixels blend between the two colours


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
@pytest.mark.parametrize("variant", range(6))
def test_every_template_and_wording_parses_back(template, variant):
    for i in range(40):
        spec = sample_spec(0, i)
        text = spec.caption(template, variant)
        assert parse_caption(text) == spec.attributes, text


def test_every_position_phrase_parses_back():
    for position in POSITIONS:
        for variant in range(3):
            spec = ShapeSpec("green", "triangle", "small", position, "white", variant=variant)
            assert parse_caption(spec.caption()).position == position


def test_parse_partial_and_free_prompts():
    assert parse_caption("a red circle") == PartialSpec(color="red", shape="circle")
    assert parse_caption("Big grey-free square, upper-right, on a purple background!") == (
        PartialSpec(shape="square", size="large", position="top right", background="purple")
    )
    assert parse_caption("something in the centre").position == "center"
    with pytest.raises(ValueError, match="two shapes"):
        parse_caption("a circle and a square")


def test_spec_rejects_bad_values_with_the_allowed_ones():
    with pytest.raises(ValueError, match="choose one of circle, square, triangle"):
        ShapeSpec("red", "hexagon", "small", "center", "blue")
    with pytest.raises(ValueError, match="must differ"):
        ShapeSpec("red", "circle", "small", "center", "red")
    with pytest.raises(ValueError, match=r"must be an int >= 32"):
        ShapesDataset(4, size=10)


def test_mirrored_spec_is_the_flipped_image_with_a_matching_caption():
    spec = ShapeSpec("yellow", "triangle", "medium", "top left", "black", dx=0.03, dy=-0.01)
    flipped = spec.mirrored()
    assert flipped.position == "top right"
    a = np.asarray(render(spec, 128))[:, ::-1].astype(int)
    b = np.asarray(render(flipped, 128)).astype(int)
    assert np.abs(a - b).max() <= 2
    assert "right" in flipped.caption() and "left" not in flipped.caption()


def test_heldout_split_is_disjoint_from_training_and_mirror_closed():
    train = {ShapesDataset(3000, seed=0).spec(i).attributes for i in range(3000)}
    held = heldout_specs(200, seed=0)
    assert not train & {s.attributes for s in held}
    assert all(is_heldout(s) and is_heldout(s.mirrored()) for s in held)
    fraction = np.mean([is_heldout(sample_spec(5, i, "heldout")) for i in range(50)])
    assert fraction == 1.0


def test_about_a_tenth_of_the_combinations_is_held_out():
    combos = heldout_combinations()
    assert 0.08 < len(combos) / (8 * 3 * 3 * 9 * 7) < 0.12
    assert all(is_heldout(c) for c in combos)


def test_heldout_prompts_cover_every_attribute_value_and_parse():
    prompts = heldout_prompts(200, seed=0)
    assert len({parse_caption(p) for p in prompts}) == 200  # distinct combinations
    assert " a orange" not in " ".join(prompts) and " an orange" in " ".join(prompts)
    parsed = [parse_caption(p) for p in prompts]
    for name, count in [("color", 8), ("shape", 3), ("size", 3), ("position", 9)]:
        assert len({getattr(p, name) for p in parsed}) == count
    assert heldout_prompts(5, seed=0) == prompts[:5]
    assert heldout_prompts(5, seed=1) != prompts[:5]


def test_short_captions_leave_out_what_is_omitted_and_parse_back():
    from noisecraft.training.shapes import OPTIONAL_ATTRIBUTES, parse_caption, sample_spec

    spec = sample_spec(0, 3)
    assert spec.caption(omit=OPTIONAL_ATTRIBUTES) in (f"a {spec.color} {w}" for w in
                                                     ("circle", "disc", "square", "triangle"))
    for omit in (("size",), ("position",), ("background",), ("size", "background")):
        text = spec.caption(omit=omit)
        got = parse_caption(text)
        for name in OPTIONAL_ATTRIBUTES:
            want = None if name in omit else getattr(spec, name)
            assert getattr(got, name) == want, (text, name)
        assert (got.color, got.shape) == (spec.color, spec.shape)
        assert text.startswith(("a ", "an "))
    assert spec.caption(omit=()) == spec.caption()
    with pytest.raises(ValueError, match="only size, position, background can be left out"):
        spec.caption(omit=("color",))
