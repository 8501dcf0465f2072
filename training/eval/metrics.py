"""Evaluation metrics from local weights: CLIP-T, CLIP-I (open_clip) and DINO-I (transformers DINO ViT)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import builtin_open_clip_name

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dino_transform(image: Tensor, size: int = 224) -> Tensor:
    """The DINO hub evaluation transform on a tensor: Resize(256 * size / 224) of the shorter side (bicubic,
    antialiased), CenterCrop(size), ImageNet normalisation (DINO's ``eval_linear``; 256 -> 224 at size 224).

    Shapes: image (3, H, W) in [0, 1] -> (3, size, size) normalised.
    """
    short = round(size * 256 / 224)
    h, w = image.shape[-2:]
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                      align_corners=False)[0].clamp(0, 1)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    x = x[:, top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Shapes: a (N, D), b (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine of row i of a with row i of b. Shapes: (N, D), (N, D) -> scalar."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).mean()


def mean_pairwise(gen: Tensor, ref: Tensor, *, exclude_diagonal: bool = False) -> Tensor:
    """Mean cosine over all (generated, reference) pairs; the diagonal is left out for a set against itself."""
    sim = cosine_matrix(gen, ref)
    if exclude_diagonal:
        n = sim.shape[0]
        if n < 2:
            return torch.tensor(float("nan"))
        return (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return sim.mean()


def crop_to_mask(image: Tensor, mask: Tensor, background: float = 0.5) -> Tensor:
    """The subject on a uniform background, cropped to a square around its mask.

    Shapes: image (3, H, W) in [0, 1], mask (H, W) -> (3, S, S); an empty mask returns the image.
    """
    if mask.max() <= 0:
        return image
    m = (mask > 0.5).float()
    seg = image * m + background * (1 - m)
    ys, xs = torch.nonzero(m, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(y1 - y0, x1 - x0)
    canvas = torch.full((3, side, side), background)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    canvas[:, oy:oy + y1 - y0, ox:ox + x1 - x0] = seg[:, y0:y1, x0:x1]
    return canvas


def require_local(path: str | None, what: str, *, folder: bool) -> None:
    """Refuses a missing or non-existent local weights path (nothing is downloaded), saying what was expected."""
    kind = "folder" if folder else "file"
    if not path:
        raise ValueError(f"{what}: expected a {kind} path, found {path!r} (a random model is only built for tiny "
                         "pipeline checks; nothing is downloaded)")
    if not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise FileNotFoundError(f"{what}: expected an existing {kind}, found no {kind} at {path} "
                                "(nothing is downloaded)")


class ClipScorer:
    """open_clip image and text embeddings (CLIP-T, CLIP-I) from a local weights file.

    ``tiny=True`` (pipeline checks only) builds the model with random weights, seeded; otherwise a missing
    weights file is an error, never a silently random CLIP.
    """

    def __init__(self, model_name: str = "ViT-B-32", weights: str | None = None, device: str = "cpu", *,
                 tiny: bool = False) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        model_name = builtin_open_clip_name(model_name, "the CLIP-T / CLIP-I model name")   # never fetched
        if tiny:
            torch.manual_seed(0)
            self.model = open_clip.create_model(model_name, pretrained=None)
        else:
            require_local(weights, f"CLIP-T and CLIP-I need local open_clip {model_name} weights", folder=False)
            self.model = open_clip.create_model(model_name, pretrained=str(weights))
        self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        # open_clip's own evaluation transform (bicubic resize of the shorter side, centre crop, its mean/std), as
        # published CLIP-T / CLIP-I numbers use it: a non-square image is cropped, never squashed
        self.preprocess = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)
        self.device = device

    def pixels(self, images: Sequence[Tensor]) -> Tensor:
        """open_clip's preprocessing of images in [0, 1], rounded to 8 bits first as a saved PNG is.
        Shapes: images[i] (3, H_i, W_i) -> (N, 3, S, S) normalised."""
        from torchvision.transforms.functional import to_pil_image
        out = []
        for n, image in enumerate(images):
            image = image.detach().float().cpu()
            if image.ndim != 3 or image.shape[0] != 3 or not torch.isfinite(image).all():
                raise ValueError(f"CLIP scorer: image {n} must be a finite (3, H, W) tensor in [0, 1], found shape "
                                 f"{tuple(image.shape)}{'' if torch.isfinite(image).all() else ' with NaN or inf'}")
            out.append(self.preprocess(to_pil_image(image.clamp(0, 1).mul(255).round().to(torch.uint8))))
        return torch.stack(out)

    @torch.no_grad()
    def images(self, images: Sequence[Tensor]) -> Tensor:
        return self.model.encode_image(self.pixels(images).to(self.device)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class DinoScorer:
    """DINO ViT class token of the last hidden state (DINO-I)."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu", *, tiny: bool = False) -> None:
        from transformers import ViTConfig, ViTModel
        if tiny:
            torch.manual_seed(0)
            self.model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=32, patch_size=8), add_pooling_layer=False)
        else:
            require_local(model_dir, "DINO-I needs a local DINO ViT folder (e.g. dino-vits16)", folder=True)
            self.model = ViTModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
        self.model.to(device).eval()
        self.size = int(self.model.config.image_size)
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Tensor]) -> Tensor:
        x = torch.stack([dino_transform(i, self.size) for i in images])
        return self.model(pixel_values=x.to(self.device)).last_hidden_state[:, 0].float().cpu()
