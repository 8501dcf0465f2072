"""The headline CLIP-T / E-CI / E-DI are over DreamBench's 25 prompts only; our style and shape prompts are
reported as separate categories."""
import json
import math
from pathlib import Path

import pytest
import torch

from training.eval.protocol import RECONSTRUCTION, EvalSubject, prompts_for

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


class _AngleScorer:
    """Stub CLIP/DINO: an image of constant value v embeds as (cos 0.01v, sin 0.01v); texts and references as
    (1, 0), so every cosine with a generation of value v is cos(0.01 v)."""

    def images(self, images):
        v = torch.stack([i.mean() for i in images]) * 0.01
        return torch.stack([v.cos(), v.sin()], dim=1)

    def texts(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))


def test_headline_is_the_mean_over_exactly_the_25_dreambench_prompts():
    from training.eval.scoring import score
    live = [f"a {{0}} {{1}} live prompt {i}" for i in range(25)]
    objects = [f"a {{0}} {{1}} object prompt {i}" for i in range(25)]
    dog = EvalSubject("dog", "dog", ("dog/00.jpg",), "dog/00.jpg", live=True)
    plan = {"dog": [RECONSTRUCTION] + prompts_for(dog, objects, live, ("style", "shape"))}
    assert len(plan["dog"]) == 31 and plan["dog"][1].template == live[0]     # the live list for a dog
    files = {("dog", i, n): i for i in range(31) for n in range(2)}          # the image of prompt i has value i
    image = lambda i: torch.full((3, 2, 2), float(i))  # noqa: E731
    stub = _AngleScorer()
    ref = {"dog": torch.tensor([[1.0, 0.0], [2.0, 0.0]])}
    head, cats = score([dog], plan, files, 2, stub, stub, ref, ref, image, image)
    f = lambda i: math.cos(0.01 * i)  # noqa: E731
    dreambench = sum(f(i) for i in range(1, 26)) / 25
    for key in ("CLIP-T", "E-CI", "E-DI"):
        assert head[key] == pytest.approx(dreambench, abs=1e-6), key
    assert head["R-CI"] == pytest.approx(1.0) and head["R-DI"] == pytest.approx(1.0)
    assert head["dreambench_pairs"] == 25
    assert sum(f(i) for i in range(1, 31)) / 30 != pytest.approx(dreambench, abs=1e-4)   # what the extras would shift
    expected = {"scene": range(1, 11), "accessory": range(11, 21), "property": range(21, 26),
                "style": range(26, 29), "shape": range(29, 31)}
    assert list(cats) == list(expected)
    for cat, idx in expected.items():
        assert cats[cat]["pairs"] == len(idx)
        assert cats[cat]["E-CI"] == pytest.approx(sum(f(i) for i in idx) / len(idx), abs=1e-6), cat


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench data not found")
def test_tiny_run_headline_is_the_weighted_mean_of_the_dreambench_categories(tmp_path):
    from training import evaluate

    report = json.loads(evaluate.main(["--tiny", "--subjects", "dog", "--images", "1", "--steps", "1",
                                       "--out", str(tmp_path)]).read_text())
    head, cats = report["methods"]["CustomContrast γ=1"], report["categories"]["CustomContrast γ=1"]
    counts = {"scene": 10, "accessory": 10, "property": 5}   # DreamBench's live list (dog); then style 3, shape 2
    for key in ("CLIP-T", "E-CI", "E-DI"):
        weighted = sum(cats[c][key] * n for c, n in counts.items()) / 25
        assert head[key] == pytest.approx(weighted, abs=1e-6), key
    assert {c: cats[c]["pairs"] for c in cats} == {**counts, "style": 3, "shape": 2}
    assert head["dreambench_pairs"] == 25
    assert "DreamBench's 25 prompts" in report["protocol"]["headline"]
    assert "| CustomContrast γ=1 | style | 3 |" in (tmp_path / "report.md").read_text()
