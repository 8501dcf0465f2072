"""Evaluation: metric functions on known embeddings, segmentation cropping, the tiny end-to-end run."""
import json
import math
from pathlib import Path

import pytest
import torch

from training.eval.metrics import cosine_matrix, crop_to_mask, mean_pairwise, paired_cosine
from training.eval.protocol import RECONSTRUCTION, EvalPrompt, categorize, read_prompts

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


def test_cosines_on_fixed_embeddings():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -3.0], [3.0, 0.0]])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(cosine_matrix(a, b), torch.tensor([[s, 0.0, 1.0], [s, -1.0, 0.0]]))
    torch.testing.assert_close(paired_cosine(a, b[:2]), torch.tensor((s - 1.0) / 2))
    torch.testing.assert_close(mean_pairwise(a, b), torch.tensor((2 * s + 0.0) / 6))
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(mean_pairwise(same, same, exclude_diagonal=True), torch.tensor(2 / 6))


def test_crop_to_mask_on_a_known_mask():
    image = torch.rand(3, 20, 30)
    mask = torch.zeros(20, 30)
    mask[5:9, 10:18] = 1                                     # 4 x 8 subject
    crop = crop_to_mask(image, mask)
    assert crop.shape == (3, 8, 8)
    torch.testing.assert_close(crop[:, 2:6, :], image[:, 5:9, 10:18])   # centred vertically
    assert (crop[:, :2] == 0.5).all() and (crop[:, 6:] == 0.5).all()
    torch.testing.assert_close(crop_to_mask(image, torch.zeros(20, 30)), image)


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_prompt_lists_and_categories():
    objects, live = read_prompts(DREAMBENCH / "prompts_and_classes.txt")
    assert len(objects) == len(live) == 25
    assert [categorize(t, True, i) for i, t in enumerate(live)].count("accessory") == 10
    assert categorize(live[24], True, 24) == "property" and categorize(objects[3], False, 3) == "scene"
    assert EvalPrompt(live[0], "scene").with_subject("dog") == "a <subject> dog in the jungle"
    assert EvalPrompt(live[0], "scene").with_class("dog") == "a dog in the jungle"
    assert RECONSTRUCTION.with_subject("cat") == "a photo of a <subject> cat"


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_tiny_end_to_end_is_complete_and_deterministic(tmp_path):
    from training import evaluate

    args = ["--tiny", "--subjects", "dog,backpack", "--prompts", "1", "--images", "1", "--steps", "2"]
    first = json.loads(evaluate.main([*args, "--out", str(tmp_path / "a")]).read_text())
    second = json.loads(evaluate.main([*args, "--out", str(tmp_path / "b")]).read_text())
    assert first["methods"] == second["methods"]
    row = first["methods"]["CustomContrast γ=1"]
    for key in ("CLIP-T", "R-CI", "E-CI", "R-DI", "E-DI"):
        assert math.isfinite(row[key]), key
    assert row["ImageReward"] == "absent"
    assert set(first["methods"]) == {"CustomContrast γ=1", "base model, no subject (lower bound)",
                                     "reference images (upper bound)"}
    assert first["protocol"]["references"]["dog"].endswith("dog/00.jpg")
    assert (tmp_path / "a" / "report.md").read_text().startswith("| method | CLIP-T")
    assert (tmp_path / "a" / "grids" / "dog_g1.png").is_file()
    assert (tmp_path / "a" / "similarity_vs_controllability.png").is_file()
    assert first["images"]["CustomContrast γ=1"] == {"generated": 4, "reused": 0, "replaced": 0}
    # resumable: a rerun with the same model and settings into the same folder reuses every image
    # (tests/test_eval_images.py: another checkpoint or other settings regenerate them)
    third = json.loads(evaluate.main([*args, "--out", str(tmp_path / "a")]).read_text())
    assert third["methods"] == first["methods"]
    assert third["images"]["CustomContrast γ=1"] == {"generated": 0, "reused": 4, "replaced": 0}
