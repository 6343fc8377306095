import pytest

from noisecraft.models.family import FAMILIES, get_family


def test_families_have_schedules_and_formats():
    assert get_family("sd2-v").prediction == "v"
    assert FAMILIES["sdxl"].latent.scaling_factor == pytest.approx(0.13025)
    assert FAMILIES["sd1"].latent.scaling_factor == pytest.approx(0.18215)
    s = FAMILIES["sd1"].schedule()
    assert s.num_timesteps == 1000 and 14.6 < s.sigma_max < 14.7


def test_unknown_family_lists_names():
    with pytest.raises(ValueError, match="sdxl-refiner"):
        get_family("sd3")
    assert get_family("sd1").with_overrides(prediction="v").prediction == "v"
