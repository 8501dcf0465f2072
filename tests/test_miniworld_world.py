"""The small world: splits that really hold out, exact masks, captions that describe the scene, per-view
captions that reach training with the target view."""
from __future__ import annotations

import colorsys
import itertools
import json

import numpy as np
import pytest

from training.data import DataConfig, SubjectDataset, read_manifest
from training.miniworld.data import WorldConfig, read_eval, read_scenes, write_scenes, write_world
from training.miniworld.world import (ALL_CONTEXTS, BACKGROUNDS, HELD_OUT_CONTEXTS, HELD_OUT_HUE_PAIRS,
                                      HELD_OUT_SHAPE_TEXTURE, HUE_WORDS, PATTERNS, POSITIONS, SIZES, SHAPES,
                                      TEXTURE_WORDS, Context, Subject, context_key, make_context, make_subject,
                                      render)


def test_held_out_subjects_share_no_colour_pair_or_shape_texture_pair_with_training() -> None:
    rng = np.random.default_rng(0)
    train = [make_subject(rng, held_out=False) for _ in range(400)]
    held = [make_subject(rng, held_out=True) for _ in range(100)]
    assert all((s.shape, s.texture) not in HELD_OUT_SHAPE_TEXTURE for s in train)
    assert all(s.hue_bins not in HELD_OUT_HUE_PAIRS for s in train)
    assert all((s.shape, s.texture) in HELD_OUT_SHAPE_TEXTURE and s.hue_bins in HELD_OUT_HUE_PAIRS for s in held)
    assert {(s.shape, s.texture) for s in train}.isdisjoint({(s.shape, s.texture) for s in held})


def test_held_out_contexts_are_never_captioned_in_training_but_every_word_is() -> None:
    rng = np.random.default_rng(1)
    train = [make_context(rng, held_out=False) for _ in range(2000)]
    held = [make_context(rng, held_out=True) for _ in range(200)]
    assert {context_key(c) for c in train}.isdisjoint(HELD_OUT_CONTEXTS)
    assert {context_key(c) for c in held} <= HELD_OUT_CONTEXTS
    assert 0.1 < len(HELD_OUT_CONTEXTS) / len(ALL_CONTEXTS) < 0.2
    seen = {word for c in train for word in context_key(c)}
    assert seen == set(BACKGROUNDS) | set(PATTERNS) | set(POSITIONS) | set(SIZES)


@pytest.mark.parametrize("position", list(POSITIONS))
def test_render_puts_the_subject_where_the_caption_says_with_an_exact_mask(position: str) -> None:
    rng = np.random.default_rng(2)
    subject = make_subject(rng, held_out=False)
    for size in SIZES:
        image, mask = render(subject, Context(position, size, "blue", "plain"), 32, rng)
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 32, ys.mean() / 32
        want_x, want_y = POSITIONS[position]
        assert abs(cx - want_x) < 0.08 and abs(cy - want_y) < 0.08
        # the mask covers exactly the pixels that are not background (plain background: one colour)
        background = image[~mask][0]
        assert (image[~mask] == background).all()
        assert (np.abs(image[mask].astype(int) - background).sum(-1) > 0).mean() > 0.95
    small = render(subject, Context(position, "small", "blue", "plain"), 32, np.random.default_rng(3))[1].sum()
    large = render(subject, Context(position, "large", "blue", "plain"), 32, np.random.default_rng(3))[1].sum()
    assert large > 1.8 * small


def test_caption_names_the_class_and_the_context() -> None:
    ctx = Context("left", "small", "red", "checkered", "ball")
    assert ctx.words("star") == "a small star at the left on a red checkered background beside a ball"
    assert Context("centre", "large", "gray", "plain").words("<subject> disc") == \
        "a large <subject> disc in the centre on a gray plain background"


def test_world_is_deterministic_and_its_training_data_carries_the_target_views_caption(tmp_path) -> None:
    cfg = WorldConfig(scenes=16, subjects=3, views=3, eval_subjects=2, eval_prompts=2, eval_renders=1)
    a, b = write_world(tmp_path / "a", cfg), write_world(tmp_path / "b", cfg)
    for rel in ("subjects/s0001/view_2.png", "subjects/s0001/mask_2.png", "eval/heldout_01/real_1_0.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    records = read_manifest(a / "subjects" / "manifest.jsonl")
    assert len(records) == 3 and all(len(r.captions) == 3 for r in records)
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=32, hflip=False))
    for index, epoch in itertools.product(range(3), range(4)):
        sample = dataset.sample(index, epoch)
        view = records[index].images.index(sample["target_path"])
        assert sample["caption"] == records[index].captions[view]
    cases = read_eval(a / "eval")
    assert [len(c.contexts) for c in cases] == [2, 2]
    assert all(context_key(ctx) in HELD_OUT_CONTEXTS for c in cases for ctx in c.contexts)


def test_fine_words_name_each_colours_hue_third_paleness_and_dimness(tmp_path) -> None:
    # hue 0.02 (first third of bin 0), saturation 0.6 (< 0.775), value 0.8 (< 0.875); hue 0.6 (middle of bin 3)
    first, second = colorsys.hsv_to_rgb(0.02, 0.6, 0.8), colorsys.hsv_to_rgb(0.6, 0.9, 0.95)
    subject = Subject("star", "stripes", (first, second))
    assert subject.description(fine=True) == "pale dim warm orange and azure banded star"
    assert subject.description() == "orange and azure banded star"
    disc = Subject("disc", "plain", (colorsys.hsv_to_rgb(0.98, 0.9, 0.9),) * 2)   # last third of bin 5
    assert disc.description(fine=True) == "cool pink disc"
    write_scenes(tmp_path / "fine.npz", WorldConfig(scenes=300, fine_words=True))
    write_scenes(tmp_path / "coarse.npz", WorldConfig(scenes=300, fine_words=False))
    (images, captions), (coarse_images, coarse) = (read_scenes(tmp_path / f"{n}.npz") for n in ("fine", "coarse"))
    assert (images == coarse_images).all()          # the same scenes, only the words differ
    fine_only = {"pale", "dim", "warm", "cool"}
    assert fine_only <= {w for c in captions for w in c.split()}
    # without its fine words, every caption is the coarse world's
    assert [" ".join(w for w in c.split() if w not in fine_only) for c in captions] == coarse


def test_subject_words_are_coarse_and_never_describe_a_held_out_subject_in_the_base_captions(tmp_path) -> None:
    assert Subject("star", "stripes", ((1.0, 0.5, 0.0), (0.0, 0.5, 1.0))).description() == \
        "orange and azure banded star"
    assert Subject("disc", "plain", ((0.9, 0.2, 0.9), (0.9, 0.2, 0.9))).description() == "pink disc"
    cfg = WorldConfig(scenes=600, subjects=1, views=1, eval_subjects=1, eval_prompts=1, eval_renders=1,
                      fine_words=False)     # the fine words reduce to these (the test above)
    write_scenes(tmp_path / "scenes.npz", cfg)
    _, captions = read_scenes(tmp_path / "scenes.npz")
    described = [c for c in captions if any(f" {w} " in c for w in HUE_WORDS)]
    assert 0.4 < len(described) / len(captions) < 0.6
    rng = np.random.default_rng(3)
    held = {make_subject(rng, held_out=True).description() for _ in range(300)}
    assert not any(d in c for d in held for c in captions)
    words = {w for c in captions for w in c.split()}
    assert set(HUE_WORDS) | {w for w in TEXTURE_WORDS.values() if w} | set(SHAPES) <= words
    # the rate does not change the scenes: the base model's images are the same with or without the words
    write_scenes(tmp_path / "plain.npz", WorldConfig(scenes=600, describe_subjects=0.0, fine_words=False))
    assert (read_scenes(tmp_path / "plain.npz")[0] == read_scenes(tmp_path / "scenes.npz")[0]).all()


def test_the_command_line_writes_the_fine_words_world(tmp_path) -> None:
    from training.miniworld.__main__ import main
    main(["--quick", "--fine-words", "--stages", "world", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "miniworld.json").read_text())["world"]["fine_words"] is True
    _, captions = read_scenes(tmp_path / "world" / "scenes.npz")
    assert {"warm", "cool"} & {w for c in captions for w in c.split()}
