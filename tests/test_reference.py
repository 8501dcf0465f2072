"""The reference crop (``customcontrast_core.reference``): one crop, 1.2x the subject's box, for training,
evaluation and the Encode Subject node."""
import pytest
import torch
import torch.nn.functional as F

from customcontrast_core.reference import GRAY, reference_crop, subject_box
from training.data import DataConfig, SubjectDataset, SubjectRecord
from training.eval.generate import reference_view


def boxed(height=60, width=80, box=(10, 20, 40, 45)):
    """A random image and a mask of ones in ``box`` (top, left, bottom, right)."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, height, width)
    mask[:, box[0]:box[2], box[1]:box[3]] = 1
    return image, mask


def test_the_crop_is_a_square_of_1_2_times_the_longer_side_centred_on_the_box():
    image, mask = boxed()                                   # box 30 x 25: longer side 30, centre (25, 32.5)
    crop, crop_mask = reference_crop(image, mask)
    assert crop.shape == (3, 36, 36) and crop_mask.shape == (1, 36, 36)
    top, left = round(25 - 18), round(32.5 - 18)            # 7, 14
    torch.testing.assert_close(crop[:, 3:33, 6:31], image[:, 10:40, 20:45], rtol=0, atol=0)   # the subject, whole
    assert crop_mask.sum() == 30 * 25 and (top, left) == (7, 14)
    assert (crop[:, crop_mask[0] == 0] == GRAY).all()       # the rest is gray


def test_a_crop_past_the_image_border_is_padded_with_the_background():
    image, mask = boxed(box=(0, 0, 30, 30))
    crop, crop_mask = reference_crop(image, mask, background=lambda shape: torch.ones(shape))
    assert crop.shape == (3, 36, 36)
    torch.testing.assert_close(crop[:, 3:33, 3:33], image[:, :30, :30], rtol=0, atol=0)
    assert (crop[:, :3] == 1).all() and (crop[:, :, :3] == 1).all()


def test_subject_box_falls_back_to_any_pixel_and_then_to_the_whole_image():
    soft = torch.zeros(1, 10, 10)
    soft[0, 2:4, 5:9] = 0.3
    assert subject_box(soft) == (2, 5, 4, 9)
    assert subject_box(torch.zeros(1, 10, 12)) == (0, 0, 10, 12)
    with pytest.raises(ValueError, match=r"a mask \(1, H, W\) of the same size, found \(3, 10, 10\) and \(1, 9, 10\)"):
        reference_crop(torch.zeros(3, 10, 10), torch.zeros(1, 9, 10))


def test_training_and_evaluation_references_are_the_core_crop(tmp_path):
    """Without augmentation the training reference (and evaluation's ``reference_view``, built by it) is the
    core crop resized to the reference size."""
    from PIL import Image
    image, mask = boxed()
    for name, pixels in (("view0.png", image), ("view1.png", image)):
        Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / name)
    Image.fromarray((mask[0] * 255).byte().numpy()).save(tmp_path / "mask0.png")
    Image.fromarray((mask[0] * 255).byte().numpy()).save(tmp_path / "mask1.png")
    record = SubjectRecord("s", "thing", (str(tmp_path / "view0.png"), str(tmp_path / "view1.png")),
                           (str(tmp_path / "mask0.png"), str(tmp_path / "mask1.png")))
    reference = SubjectDataset([record], DataConfig(reference_size=32, target_size=32, augment=False))[0]["reference"]
    loaded = torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "view0.png"))).permute(2, 0, 1) / 255
    crop, _ = reference_crop(loaded.float(), mask)
    expected = F.interpolate(crop[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(reference, expected.clamp(0, 1), rtol=0, atol=1e-6)
    view = reference_view(tmp_path / "view0.png", tmp_path / "mask0.png", 32)
    torch.testing.assert_close(view, expected.clamp(0, 1), rtol=0, atol=1e-6)
