"""Evaluation metric models: DINO's hub preprocessing, and no silently random CLIP or DINO outside --tiny."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.eval.metrics import IMAGENET_MEAN, IMAGENET_STD, ClipScorer, DinoScorer

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_dino_transform_is_resize_256_then_centre_crop_224():
    from training.eval.metrics import dino_transform
    ramp = torch.arange(512, dtype=torch.float32).div(511).expand(3, 256, 512).clone()   # value = column / 511
    out = dino_transform(ramp, 224)          # shorter side already 256: the resize keeps it, the crop takes 224
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, _normalised(ramp[:, 16:240, 144:368]))
    square = torch.rand(3, 512, 512)         # 512 -> 256 (one resize), then the centre 224
    expected = torch.nn.functional.interpolate(square[None], size=(256, 256), mode="bicubic", antialias=True,
                                               align_corners=False)[0].clamp(0, 1)[:, 16:240, 16:240]
    torch.testing.assert_close(dino_transform(square, 224), _normalised(expected))


def test_dino_scorer_feeds_the_centre_crop_not_a_squashed_image():
    scorer = DinoScorer(tiny=True)           # ViT image size 32 -> Resize(37), CenterCrop(32) (rows/cols 2..33)
    seen = []
    scorer.model = lambda pixel_values: seen.append(pixel_values) or SimpleNamespace(
        last_hidden_state=torch.zeros(pixel_values.shape[0], 1, 4))
    image = torch.full((3, 37, 37), 0.1)
    image[:, 2:34, 2:34] = 0.8               # the border (0.1) must be cropped away entirely
    scorer.images([image])
    assert seen[0].shape == (1, 3, 32, 32)
    torch.testing.assert_close(seen[0][0], _normalised(torch.full((3, 32, 32), 0.8)))


def test_clip_scorer_refuses_missing_weights_outside_tiny(tmp_path):
    with pytest.raises(ValueError, match=r"expected a file path, found None"):
        ClipScorer("ViT-B-32", None)
    with pytest.raises(FileNotFoundError, match=r"expected an existing file, found no file at .*missing\.pt"):
        ClipScorer("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"expected an existing folder, found no folder at .*nodino"):
        DinoScorer(str(tmp_path / "nodino"))
    a, b = ClipScorer("ViT-B-32", None, tiny=True), ClipScorer("ViT-B-32", None, tiny=True)
    torch.testing.assert_close(a.texts(["a dog"]), b.texts(["a dog"]))    # tiny: random but seeded


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_evaluate_names_the_missing_metric_key_of_eval_json(tmp_path):
    from customcontrast_core import checkpoint
    from customcontrast_core.config import get_preset
    from customcontrast_core.visual_kv import CustomContrastModel
    from training import evaluate

    ckpt = checkpoint.save(tmp_path / "cc.safetensors", CustomContrastModel(get_preset("tiny")))
    (tmp_path / "dino").mkdir()
    config = tmp_path / "eval.json"
    args = ["--checkpoint", str(ckpt), "--config", str(config), "--subjects", "dog", "--out", str(tmp_path / "o")]
    config.write_text(json.dumps({"paths": {}, "dino_dir": str(tmp_path / "dino")}))
    with pytest.raises(ValueError, match=r"key 'clip_weights' must give the local path of an open_clip ViT-B-32 "
                                         r"weights file; found no such key"):
        evaluate.main(args)
    config.write_text(json.dumps({"paths": {}, "dino_dir": str(tmp_path / "dino"),
                                  "clip_weights": str(tmp_path / "clip.bin")}))
    with pytest.raises(FileNotFoundError, match=r"key 'clip_weights' .* found no such file at .*clip\.bin"):
        evaluate.main(args)
    config.write_text(json.dumps({"paths": {}, "clip_weights": str(ckpt)}))
    with pytest.raises(ValueError, match=r"key 'dino_dir' must give the local path of a DINO ViT-S/16 folder"):
        evaluate.main(args)


def test_clip_scorer_preprocesses_as_open_clip_does_on_a_non_square_image():
    """Bicubic resize of the shorter side to 224, centre crop, CLIP's mean/std: open_clip's own evaluation
    transform, applied to the 8-bit image; a band at the side of a wide image is cropped away, not squashed in."""
    import open_clip
    from PIL import Image

    scorer = ClipScorer("ViT-B-32", None, tiny=True)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 240, 400)).float() / 255            # landscape, 8-bit values
    image[:, :, :60] = 1.0                                                 # a white band left of the centre square
    reference = open_clip.image_transform(224, is_train=False)             # open_clip's defaults (OpenAI mean/std)
    expected = reference(Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy()))
    pixels = scorer.pixels([image])
    assert pixels.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=0)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    shown = pixels[0] * std + mean
    assert (shown[:, :, :8] > 0.99).float().mean() < 0.05                 # the band is not in the crop
    features = scorer.images([image, image[:, :, 20:]])                   # the scorer embeds exactly these pixels
    with torch.no_grad():
        torch.testing.assert_close(features[:1], scorer.model.encode_image(expected[None]).float())
    with pytest.raises(ValueError, match=r"image 1 must be a finite \(3, H, W\) tensor .* with NaN or inf"):
        scorer.images([image, torch.full((3, 8, 8), float("nan"))])
