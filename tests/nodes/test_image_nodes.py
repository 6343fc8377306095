import torch

from noisecraft.nodes.image import (
    GrowMask,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
    InvertMask,
)
from noisecraft.nodes.latent import (
    EmptyLatentImage,
    LatentFromBatch,
    LatentUpscale,
    LatentUpscaleBy,
    RepeatLatentBatch,
    SetLatentNoiseMask,
)


def test_pad_for_outpaint_shapes_values_and_feathered_mask():
    image = torch.rand(2, 16, 20, 3)
    out, mask = ImagePadForOutpaint.execute(image, left=8, top=0, right=0, bottom=4,
                                            feathering=4)
    assert out.shape == (2, 20, 28, 3) and mask.shape == (20, 28)
    assert torch.equal(out[:, 0:16, 8:28], image)
    assert (out[:, :, :8] == 0.5).all() and (out[:, 16:] == 0.5).all()
    assert (mask[:, :8] == 1).all() and (mask[16:] == 1).all()
    # inside: distance d to the padded left side / bottom; value ((4 - d) / 4)^2 when d < 4
    assert mask[5, 8].item() == 1.0 and mask[5, 9].item() == (3 / 4) ** 2
    assert mask[5, 12].item() == 0.0 and mask[15, 20].item() == (3 / 4) ** 2
    _, plain = ImagePadForOutpaint.execute(image, 8, 0, 0, 0, feathering=0)
    assert plain[:, 8:].sum() == 0


def test_scale_and_scale_by():
    image = torch.rand(1, 10, 20, 3)
    assert ImageScale.execute(image, "bilinear", 40, 0, "disabled")[0].shape == (1, 20, 40, 3)
    assert ImageScale.execute(image, "nearest-exact", 0, 0, "disabled")[0] is image
    cropped = ImageScale.execute(image, "area", 10, 10, "center")[0]
    assert cropped.shape == (1, 10, 10, 3)
    assert torch.allclose(cropped, image[:, :, 5:15])  # centre square, same size: unchanged
    assert ImageScaleBy.execute(image, "lanczos", 1.5)[0].shape == (1, 15, 30, 3)


def test_invert_image_and_mask():
    image = torch.tensor([[[[0.0, 0.25, 1.0]]]])
    assert torch.equal(ImageInvert.execute(image)[0], torch.tensor([[[[1.0, 0.75, 0.0]]]]))
    assert torch.equal(InvertMask.execute(torch.zeros(2, 3))[0], torch.ones(2, 3))


def test_grow_mask_dilates_and_erodes_with_tapered_corners():
    mask = torch.zeros(7, 7)
    mask[3, 3] = 1
    (plus,) = GrowMask.execute(mask, 1, True)
    assert plus.shape == (1, 7, 7) and plus.sum() == 5 and plus[0, 2, 2] == 0
    (square,) = GrowMask.execute(mask, 1, False)
    assert square.sum() == 9 and square[0, 2, 2] == 1
    (diamond,) = GrowMask.execute(mask, 2, True)
    assert diamond.sum() == 13
    (shrunk,) = GrowMask.execute(square, -1, False)
    assert torch.equal(shrunk[0], mask)


def test_latent_nodes():
    (latent,) = EmptyLatentImage.execute(512, 768, 3)
    assert latent["samples"].shape == (3, 4, 96, 64) and latent["samples"].abs().sum() == 0
    assert LatentUpscale.execute(latent, "bilinear", 1024, 0, "disabled")[0]["samples"].shape \
        == (3, 4, 192, 128)
    assert LatentUpscaleBy.execute(latent, "nearest-exact", 1.5)[0]["samples"].shape == \
        (3, 4, 144, 96)
    (one,) = LatentFromBatch.execute(latent, 1, 5)
    assert one["samples"].shape[0] == 2 and one["batch_index"] == [1, 2]
    (rep,) = RepeatLatentBatch.execute(one, 2)
    assert rep["samples"].shape[0] == 4 and rep["batch_index"] == [1, 2, 3, 4]
    (masked,) = SetLatentNoiseMask.execute(latent, torch.ones(96, 64))
    assert masked["noise_mask"].shape == (1, 1, 96, 64) and "noise_mask" not in latent
