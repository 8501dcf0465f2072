"""Real-model loading from local paths, exercised with tiny models saved in the standard folder layouts."""
import json
from pathlib import Path

import pytest
import torch

from customcontrast_core import get_preset
from training.config import ModelPaths, TrainConfig
from training.models import build_from_paths, build_tiny


def clip_tokenizer_files(folder: Path) -> None:
    """vocab.json / merges.txt of the CLIP BPE, written from the copy open_clip ships (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    names = {tok.all_special_ids[0]: "<|startoftext|>", tok.all_special_ids[1]: "<|endoftext|>"}
    vocab = {names.get(i, word): i for word, i in tok.encoder.items()}   # Hugging Face's special-token names
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    import open_clip
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("models")
    config = get_preset("tiny")
    tiny = build_tiny(config, image_size=64, reference_size=32)
    clip_tokenizer_files(root / "bpe")
    tokenizer = CLIPTokenizer(str(root / "bpe" / "vocab.json"), str(root / "bpe" / "merges.txt"))
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text.encoders[0], tokenizer=tokenizer,
                                   unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    tiny.clip_vision.model.save_pretrained(root / "clip_vision")
    appearance = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(appearance.state_dict(), root / "vit_b32.pt")
    return config, ModelPaths(diffusion=str(root / "sd"), clip_vision=str(root / "clip_vision"),
                              appearance_model="ViT-B-32", appearance_weights=str(root / "vit_b32.pt"))


def test_build_from_local_folders(local_models):
    config, paths = local_models
    frozen = build_from_paths(config, paths)
    tokens = frozen.text.tokenize(["a photo of a <subject> dog"], "<subject>")
    assert tokens.slots == ((5,),)
    contexts, _ = frozen.text(tokens, torch.randn(1, 16, 32))
    assert contexts.shape == (16, 77, 32) and torch.isfinite(contexts).all()
    assert frozen.clip_vision.size == 32 and frozen.appearance.size == 224


def test_training_steps_from_local_folders(local_models, tmp_path):
    from training.loop import train

    config, paths = local_models
    cfg = TrainConfig(tiny_models=False, paths=paths, steps=2, synthetic_subjects=4, synthetic_views=2,
                      output_dir=str(tmp_path / "run"), save_every=2)
    path = train(cfg)
    assert path.is_file()


def test_missing_paths_say_nothing_is_downloaded():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded|Nothing is downloaded"):
        build_from_paths(get_preset("tiny"), ModelPaths(diffusion="/nope", clip_vision="/nope"))
