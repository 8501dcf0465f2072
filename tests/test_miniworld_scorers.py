"""The small world's scorers: trained in quick mode, they read real renders well above chance, prefer the same
subject over another, score captions exactly, refuse bad images, and are deterministic and cached."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from training.miniworld.scorer_data import reference_render, render_pool, visible_colors
from training.miniworld.scorer_models import CONTEXT_VALUES, Scorers, load_scorers, pair_delta_e, rgb_to_lab
from training.miniworld.scorer_training import scorer_config, train_all
from training.miniworld.scorers import FILE, score_images, score_per_image, train_scorers, validate
from training.miniworld.world import Context, Subject

# measured in quick mode, seed 0: 0.676, 0.358, 0.425, 0.992, 0.996, 1.0, 0.858, 0.946, 0.803 and delta-E 42.8
THRESHOLDS = {
    ("appearance", "same_beats_other"): 0.62,
    ("subject", "shape_acc"): 0.30,
    ("subject", "texture_acc"): 0.37,
    ("context", "background_acc"): 0.95,
    ("context", "pattern_acc"): 0.95,
    ("context", "position_acc"): 0.95,
    ("context", "size_acc"): 0.78,
    ("context", "companion_acc"): 0.88,
    ("context", "companion_shown_acc"): 0.70,
}
MAX_DELTA_E = 48.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorers")
    return folder, train_scorers(folder, seed=0, quick=True)


@pytest.fixture(scope="module")
def held_out():
    """Held-out subjects, each in two held-out contexts. Shapes: images (N, 2, 32, 32, 3)."""
    return render_pool(48, 2, 32, np.random.default_rng(99), held_out_subjects=1.0, held_out_contexts=True)


def test_quick_scorers_read_held_out_renders_well_above_chance(trained):
    # mutation: shuffle the subject/context labels in training -> accuracies fall to chance and this fails
    _, scorers = trained
    report = validate(scorers, n_subjects=120)
    assert report == scorers.meta["validation"]          # the file carries the same report validate() gives
    for (part, name), low in THRESHOLDS.items():
        assert report[part][name] >= low, (part, name, report[part][name])
        if name in report["chance"]:
            assert low >= report["chance"][name] + 0.1
    assert report["appearance"]["top1"] >= 5 * report["chance"]["top1"]
    assert report["subject"]["delta_e"] <= MAX_DELTA_E < report["subject"]["delta_e_other"]


def test_appearance_prefers_the_same_subject_in_another_scene(trained, held_out):
    # mutation: the reference's embedding replaced by another subject's (refs.roll) -> same < other, fails
    _, scorers = trained
    reference, view = held_out.images[:, 0], held_out.images[:, 1]
    contexts = [c[1] for c in held_out.contexts]
    same = score_per_image(scorers, view, contexts, references=reference)["appearance"]
    other = score_per_image(scorers, np.roll(view, 1, 0), contexts, references=reference)["appearance"]
    assert same.mean() > other.mean() + 0.08
    assert (same > other).mean() >= 0.55


def test_real_renders_score_their_own_subject_and_caption(trained, held_out):
    # mutation: text_acc counted against the predicted value instead of the asked one -> wrong captions score 1
    _, scorers = trained
    images, contexts = held_out.images[:, 1], [c[1] for c in held_out.contexts]
    right = score_images(scorers, images, contexts, subjects=held_out.subjects)
    wrong = score_images(scorers, images, contexts[1:] + contexts[:1], subjects=held_out.subjects[1:] +
                         held_out.subjects[:1])
    assert right["text_acc"] >= 0.8 and wrong["text_acc"] <= right["text_acc"] - 0.3
    assert right["shape_acc"] >= wrong["shape_acc"] + 0.15
    assert right["delta_e"] < wrong["delta_e"] - 10
    assert right["appearance"] > 0 and set(right) >= {"appearance", "shape_acc", "texture_acc", "delta_e",
                                                      "text_acc", "text_prob", "background_acc", "size_acc"}


class FixedContext(nn.Module):
    """Predicts red, checkered, left, small, ball for every image (as one-hot logits)."""

    def forward(self, images):
        said = {"background": "red", "pattern": "checkered", "position": "left", "size": "small", "companion": "ball"}
        return {name: torch.nn.functional.one_hot(torch.tensor(values.index(said[name])), len(values))
                .float().expand(len(images), -1) * 50 for name, values in CONTEXT_VALUES.items()}


def test_text_score_is_the_share_of_asked_attributes_shown():
    # mutation: companion counted even where no companion is asked -> image 0 scores 3/5, not 3/4
    scorers = Scorers.build(scorer_config(0, True).net, 0).freeze()
    scorers.context = FixedContext()
    subject = Subject("star", "dots", ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    contexts = [Context("left", "large", "red", "checkered"),                    # 3 of 4 asked shown
                Context("left", "small", "blue", "checkered", companion="block"),  # 3 of 5
                Context("right", "small", "red", "plain", companion="ball")]     # 3 of 5
    per_image = score_per_image(scorers, np.zeros((3, 32, 32, 3), np.uint8), contexts, subjects=[subject] * 3)
    np.testing.assert_allclose(per_image["text_acc"], [3 / 4, 3 / 5, 3 / 5])
    np.testing.assert_allclose(per_image["text_prob"], [3 / 4, 3 / 5, 3 / 5], atol=1e-6)
    assert math.isnan(per_image["companion_acc"][0]) and list(per_image["companion_acc"][1:]) == [0.0, 1.0]
    means = score_images(scorers, np.zeros((3, 32, 32, 3), np.uint8), contexts, subjects=[subject] * 3)
    assert means["companion_acc"] == 0.5 and means["size_acc"] == pytest.approx(2 / 3)
    assert "companion_acc" not in score_images(scorers, np.zeros((1, 32, 32, 3), np.uint8), contexts[:1],
                                               subjects=[subject])


def test_colour_distance_is_cielab_and_ignores_the_pair_order():
    # mutation: no min over the two orderings -> the swapped pair scores 176.3, not 0
    np.testing.assert_allclose(rgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])),
                               [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20]], atol=0.02)
    red_blue = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert pair_delta_e(red_blue.flip(1), red_blue).item() == pytest.approx(0.0, abs=1e-4)
    black = torch.zeros(1, 2, 3)
    assert pair_delta_e(black, torch.ones(1, 2, 3)).item() == pytest.approx(100.0, abs=1e-3)
    plain = Subject("disc", "plain", ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    assert visible_colors(plain) == ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0))       # the second colour is never drawn


def test_same_seed_gives_identical_scorers():
    # mutation: a training stream not seeded from the config (np.random.default_rng()) -> weights differ
    cfg = dataclasses.replace(scorer_config(0, True), subjects=64, batch_size=16, appearance_steps=3,
                              subject_steps=3, context_steps=3)
    first, second = train_all(cfg)[0], train_all(cfg)[0]
    for name, module in first.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, second.modules()[name].state_dict()[key]), (name, key)
    other = Scorers.build(cfg.net, seed=1)
    assert not torch.equal(first.appearance.head.weight, other.appearance.head.weight)
    assert not torch.equal(first.subject.heads["shape"].weight, Scorers.build(cfg.net, 0).subject.heads["shape"].weight)


def test_cached_scorers_load_back_and_another_config_is_refused(trained):
    # mutation: a file of another configuration loaded instead of refused -> "DID NOT RAISE ValueError"
    folder, scorers = trained
    path = folder / FILE
    stamp = path.stat().st_mtime_ns
    loaded = train_scorers(folder, seed=0, quick=True)
    assert path.stat().st_mtime_ns == stamp and loaded.meta == load_scorers(path).meta == load_scorers(folder).meta
    assert loaded.meta["config"]["seed"] == 0 and set(loaded.meta["validation"]) >= {"appearance", "subject",
                                                                                     "context"}
    for name, module in scorers.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, loaded.modules()[name].state_dict()[key])
    with pytest.raises(ValueError, match="scorers.safetensors holds scorers trained with"):
        train_scorers(folder, seed=1, quick=True)
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("images, message", [
    (np.full((2, 3, 32, 32), np.nan, np.float32), "images: 6144 values are NaN"),
    (np.zeros((2, 3, 32, 32), np.float32) - 1, r"images: float images must lie in \[0, 1\]"),
    (np.zeros((2, 64, 64, 3), np.uint8), "images: the scorers read 32x32 images, found 64x64"),
    (np.zeros((2, 32, 32), np.uint8), r"images: uint8 images must be \(B, H, W, 3\), found shape \(2, 32, 32\)"),
    (np.zeros((3, 32, 32, 3), np.uint8), r"contexts: expected one per image \(3\), found 2"),
])
def test_bad_images_are_refused_by_name(images, message):
    scorers = Scorers.build(scorer_config(0, True).net, 0).freeze()
    subject = Subject("star", "dots", ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    contexts = [Context("left", "large", "red", "checkered")] * 2
    with pytest.raises(ValueError, match=message):
        score_images(scorers, images, contexts, subjects=[subject] * len(images))


def test_references_alone_or_subjects_alone():
    scorers = Scorers.build(scorer_config(0, True).net, 0).freeze()
    subject = Subject("star", "dots", ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)))
    image = reference_render(subject, 32)[None]
    ctx = [Context("centre", "large", "gray", "plain")]
    by_subject = score_images(scorers, image, ctx, subjects=[subject])
    assert by_subject["appearance"] == pytest.approx(1.0, abs=1e-5)     # the image is its own reference render
    by_reference = score_images(scorers, image, ctx, references=image)
    assert by_reference["shape_acc"] == 1.0 and by_reference["delta_e"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="needs the subjects, their reference renders, or both"):
        score_images(scorers, image, ctx)


def test_one_scene_shortcut_equals_the_batch_call(trained, held_out):
    # mutation: Scorers.score ignores its reference (renders the subject instead) -> appearance differs
    _, scorers = trained
    subject, ctx = held_out.subjects[0], held_out.contexts[0][1]
    views = torch.from_numpy(held_out.images[:4, 1]).permute(0, 3, 1, 2).float() / 255     # (4, 3, 32, 32)
    reference = torch.from_numpy(held_out.images[0, 0]).permute(2, 0, 1).float() / 255     # (3, 32, 32)
    batch = score_images(scorers, views, [ctx] * 4, subjects=[subject] * 4, references=reference.expand(4, -1, -1, -1))
    assert scorers.score(views, reference, subject, ctx) == batch
    assert scorers.score(views, held_out.images[0, 0], subject, ctx) == pytest.approx(batch, abs=1e-6)
    rendered = scorers.score(views, None, subject, ctx)
    assert rendered["appearance"] != pytest.approx(batch["appearance"], abs=1e-4)
