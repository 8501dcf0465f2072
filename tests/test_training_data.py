"""Manifest, procedural subjects, samples, builders and mask caching."""
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (DataConfig, EpochBatches, SubjectDataset, SubjectRecord, from_mvimgnet,
                           from_openimages_csv, from_subject_folders, generate_synthetic, read_manifest,
                           write_manifest)
from training.config import TrainConfig
from training.data.batches import replacement_candidates
from training.loop import _records
from training.data.masks import SamMasker, default_box

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


def test_manifest_round_trip_and_errors(tmp_path):
    records = [SubjectRecord("a", "dog", (str(tmp_path / "a0.png"), str(tmp_path / "a1.png")), None, "a <subject>")]
    path = write_manifest(tmp_path / "m.jsonl", records)
    assert read_manifest(path) == records
    path.write_text('{"subject": "x", "class": "dog", "images": ["a.png", "b.png"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(path)
    path.write_text('{"subject": "x", "images": ["a.png", "b.png"]}\n')
    with pytest.raises(ValueError, match=r":1: missing field 'class'"):
        read_manifest(path)
    path.write_text('{"subject": "x", "class": "dog", "images": ["a.png"]}\n')
    with pytest.raises(ValueError, match="at least 2 views"):
        read_manifest(path)
    assert len(read_manifest(path, allow_single=True)) == 1


def test_relative_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = read_manifest(generate_synthetic("runs/x/data", num_subjects=2, views=2, size=16, seed=0))
    assert all(Path(p).is_file() for r in records for p in r.images + r.masks)
    assert '"subject_0000/view_0.png"' in Path("runs/x/data/manifest.jsonl").read_text()


def test_synthetic_is_deterministic_with_exact_masks(tmp_path):
    a = read_manifest(generate_synthetic(tmp_path / "a", num_subjects=4, views=3, size=48, seed=5))
    b = read_manifest(generate_synthetic(tmp_path / "b", num_subjects=4, views=3, size=48, seed=5))
    c = read_manifest(generate_synthetic(tmp_path / "c", num_subjects=4, views=3, size=48, seed=6))
    for ra, rb, rc in zip(a, b, c):
        assert all(Path(x).read_bytes() == Path(y).read_bytes() for x, y in zip(ra.images, rb.images))
        assert any(Path(x).read_bytes() != Path(y).read_bytes() for x, y in zip(ra.images, rc.images))
        views = [np.asarray(Image.open(p), dtype=float) for p in ra.images]
        assert np.abs(views[0] - views[1]).mean() > 1   # views of one subject differ
        for mask_path in ra.masks:
            mask = np.asarray(Image.open(mask_path))
            assert set(np.unique(mask)) <= {0, 255} and 0.02 < (mask > 0).mean() < 0.9


@pytest.fixture()
def records(tmp_path):
    return read_manifest(generate_synthetic(tmp_path / "s", num_subjects=4, views=3, size=64, seed=0))


def test_sample_fields_shapes_and_views(records):
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=64))
    sample = dataset[1]
    assert sample["reference"].shape == sample["positive"].shape == (3, 32, 32)
    assert sample["target"].shape == (3, 64, 64) and sample["target_mask"].shape == (1, 64, 64)
    assert 0 <= sample["reference"].min() and sample["reference"].max() <= 1
    assert -1 <= sample["target"].min() and sample["target"].max() <= 1
    assert set(sample["target_mask"].unique().tolist()) <= {0.0, 1.0}
    assert sample["reference_path"] != sample["target_path"]
    assert sample["caption"] == f"a photo of a <subject> {records[1].cls}" and sample["subject_index"] == 1


def test_samples_are_reproducible_and_change_with_epoch(records):
    cfg = DataConfig(reference_size=32, target_size=64, seed=3)
    a, b = SubjectDataset(records, cfg), SubjectDataset(records, cfg)
    torch.testing.assert_close(a[2]["reference"], b[2]["reference"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["reference"], b[2]["reference"])


def test_corrupt_item_is_skipped_and_logged(records, caplog):
    Path(records[0].images[0]).write_bytes(b"not a png")
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=64, augment=False))
    with caplog.at_level(logging.WARNING):
        sample = dataset[0]
    assert sample["subject_index"] == 1 and "skipping subject 'subject_0000'" in caplog.text
    for record in records:
        Path(record.images[0]).write_bytes(b"broken")
    with pytest.raises(RuntimeError, match=r"subject 0 and its 3 replacement candidates are all unreadable "
                                           r"\(of 4 subjects; the last: .*view_0.png cannot be decoded as an image"):
        dataset[0]


def test_corrupt_subject_is_replaced_from_outside_the_global_batch(tmp_path):
    records = read_manifest(generate_synthetic(tmp_path / "s", num_subjects=7, views=3, size=32, seed=0))
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=32, augment=False))
    one = EpochBatches(dataset, epoch=0, batch_size=4, rank=0, world=1, seed=0)
    two = [EpochBatches(dataset, epoch=0, batch_size=2, rank=r, world=2, seed=0) for r in (0, 1)]
    assert one.batches == two[0].batches == two[1].batches == [[4, 0, 5, 3]]
    # candidates outside the batch after its first subject (6, 1, 2), dealt round-robin to the 4 positions,
    # then the others (a small dataset: position 3 gets none of its own, but is never left without one)
    assert [replacement_candidates([4, 0, 5, 3], p, 7) for p in range(4)] == [[6, 1, 2], [1, 6, 2], [2, 6, 1],
                                                                             [6, 1, 2]]
    Path(records[4].images[0]).write_bytes(b"broken")   # its neighbour 5 is in the batch: no longer taken
    assert one[0]["subject_index"].tolist() == [6, 0, 5, 3]
    Path(records[5].images[0]).write_bytes(b"broken")   # on the other process: its own candidate, not 6
    assert two[0][0]["subject_index"].tolist() + two[1][0]["subject_index"].tolist() == [6, 0, 2, 3]
    Path(records[3].images[0]).write_bytes(b"broken")   # position 3 has no own candidate: the first readable other
    assert two[1][0]["subject_index"].tolist() == [2, 6]
    for i in (0, 1, 2, 6):
        Path(records[i].images[0]).write_bytes(b"broken")
    with pytest.raises(RuntimeError, match=r"subject 5 and its 3 replacement candidates are all unreadable"):
        two[1][0]


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared DreamBench photos not found")
def test_dreambench_folder_builder():
    records = from_subject_folders(DREAMBENCH)
    assert len(records) == 30 and sum(len(r.images) for r in records) == 158
    classes = {r.subject: r.cls for r in records}
    assert classes["dog6"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    sample = SubjectDataset(records, DataConfig(reference_size=32, target_size=64))[0]
    assert sample["reference"].shape == (3, 32, 32)


def test_mvimgnet_and_openimages_builders(tmp_path):
    for obj, n in (("obj1", 3), ("obj2", 1)):
        (tmp_path / "mv" / "7" / obj / "images").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "mv" / "7" / obj / "images" / f"{i:03d}.jpg")
    (tmp_path / "mv" / "7" / "obj1" / "images" / "broken.jpg").write_bytes(b"x")
    records = from_mvimgnet(tmp_path / "mv", class_names={"7": "chair"})
    assert [(r.subject, r.cls, len(r.images)) for r in records] == [("7/obj1", "chair", 3)]
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "abc.jpg")
    Image.new("L", (8, 8), 255).save(tmp_path / "msk" / "abc_m01_x.png")
    (tmp_path / "oi.csv").write_text("MaskPath,ImageID,LabelName,BoxID\nabc_m01_x.png,abc,/m/01,x\n"
                                     "missing.png,nope,/m/02,y\n")
    oi = from_openimages_csv(tmp_path / "oi.csv", tmp_path / "img", tmp_path / "msk", label_names={"/m/01": "cat"})
    assert [(r.cls, len(r.images), r.masks is not None) for r in oi] == [("cat", 1, True)]


class FakePredictor:
    def __init__(self):
        self.calls, self.boxes = 0, []

    def set_image(self, rgb):
        self.shape = rgb.shape

    def predict(self, box, multimask_output):
        self.calls += 1
        self.boxes.append(box.tolist())
        mask = np.zeros(self.shape[:2], dtype=bool)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
        return mask[None], np.array([0.9]), None


def test_sam_masks_are_cached_and_use_the_box(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 20), (10, 200, 30)).save(image)
    masker = SamMasker.__new__(SamMasker)
    masker.predictor, masker.model_type, masker.cache_dir = FakePredictor(), "vit_b", tmp_path / "cache"
    first = masker(image)
    second = masker(image)
    assert first == second and masker.predictor.calls == 1
    assert masker.predictor.boxes == [list(default_box(40, 20))]
    masker(image, (5, 5, 10, 10))
    assert masker.predictor.calls == 2
    mask = np.asarray(Image.open(masker(image, (5, 5, 10, 10))))
    assert mask[7, 7] == 255 and mask[0, 0] == 0


def test_sam_random_init_runs_on_one_image(tmp_path):
    """The real segment-anything predictor, built from its registry without weights."""
    image = tmp_path / "y.png"
    Image.new("RGB", (64, 48), (120, 30, 30)).save(image)
    masker = SamMasker(None, "vit_b", cache_dir=tmp_path / "cache")
    out = np.asarray(Image.open(masker(image)))
    assert out.shape == (48, 64) and set(np.unique(out)) <= {0, 255}


def _manifest_without(records, tmp_path, *, masks: bool, views: int):
    """The records with their first ``views`` images, with or without masks, as a manifest."""
    kept = [SubjectRecord(r.subject, r.cls, r.images[:views], r.masks[:views] if masks else None) for r in records]
    return write_manifest(tmp_path / f"m_{masks}_{views}.jsonl", kept)


def test_manifest_without_masks_is_refused_unless_allowed(records, tmp_path, caplog):
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    path = _manifest_without(records, tmp_path, masks=False, views=3)
    with pytest.raises(ValueError, match=r"4 of the 4 subjects of .*m_False_3.jsonl have no masks \(first: "
                                         r"'subject_0000'\).*set allow_unmasked=true"):
        _records(TrainConfig(data=str(path)), tmp_path, accelerator)
    with caplog.at_level(logging.WARNING):
        loaded = _records(TrainConfig(data=str(path), allow_unmasked=True), tmp_path, accelerator)
    assert [r.subject for r in loaded] == [r.subject for r in records] and all(r.masks is None for r in loaded)
    assert caplog.text.count("have no masks") == 1 and "(allow_unmasked=true)" in caplog.text
    masked = _manifest_without(records, tmp_path, masks=True, views=3)
    assert len(_records(TrainConfig(data=str(masked)), tmp_path, accelerator)) == 4


def test_single_view_manifest_needs_allow_single_view(records, tmp_path):
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    path = _manifest_without(records, tmp_path, masks=True, views=1)
    with pytest.raises(ValueError, match=r"has 1 image; .*set allow_single_view=true in the training config"):
        _records(TrainConfig(data=str(path)), tmp_path, accelerator)
    loaded = _records(TrainConfig(data=str(path), allow_single_view=True), tmp_path, accelerator)
    assert [len(r.images) for r in loaded] == [1, 1, 1, 1]
    sample = SubjectDataset(loaded, DataConfig(reference_size=32, target_size=64))[2]
    assert sample["reference_path"] == sample["target_path"] == loaded[2].images[0]


COLOUR = (0.35, 0.55, 0.65)   # a flat subject colour; jittered by at most 0.3 it stays inside [0, 1]


@pytest.fixture()
def flat_subject(tmp_path):
    """One subject, two identical views: a flat-coloured square on gray, with its exact mask."""
    image = np.full((64, 64, 3), 128, np.uint8)
    image[16:48, 16:48] = np.round(np.array(COLOUR) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    paths = []
    for name, array in (("view.png", image), ("mask.png", mask)):
        Image.fromarray(array).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    view, mask_path = paths
    return [SubjectRecord(subject="flat", cls="square", images=(view, view), masks=(mask_path, mask_path))]


def _reference_centres(records, jitter: float, epochs: int = 8) -> np.ndarray:
    dataset = SubjectDataset(records, DataConfig(reference_size=32, target_size=32, reference_jitter=jitter))
    centres = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        centres.append(dataset[0]["reference"][:, 16, 16].numpy())
    return np.stack(centres)


def test_reference_jitter_zero_keeps_the_subjects_colours(flat_subject):
    """With augmentation on and jitter 0 the reference shows the subject's own colour at every epoch (fails if the
    jitter ignores ``reference_jitter``); with jitter 0.3 each epoch's colour is ((v - 0.5) c + 0.5) b, one
    brightness b and one contrast c for the three channels, both within 1 ± 0.3 (fails if the amount is fixed
    or the channels are jittered apart)."""
    colour = np.round(np.array(COLOUR) * 255) / 255
    np.testing.assert_allclose(_reference_centres(flat_subject, 0.0), np.tile(colour, (8, 1)), atol=1e-5)
    jittered = _reference_centres(flat_subject, 0.3)
    bc = (jittered[:, 0] - jittered[:, 2]) / (colour[0] - colour[2])    # b * c, from two channel differences
    np.testing.assert_allclose((jittered[:, 1] - jittered[:, 2]) / (colour[1] - colour[2]), bc, rtol=1e-3)
    b = (jittered[:, 2] - bc * (colour[2] - 0.5)) / 0.5                  # v' = b c (v - 0.5) + 0.5 b
    c = bc / b
    assert ((0.7 - 1e-4 <= b) & (b <= 1.3 + 1e-4) & (0.7 - 1e-4 <= c) & (c <= 1.3 + 1e-4)).all()
    assert np.abs(b - 1).max() > 0.15 and np.abs(c - 1).max() > 0.15      # the full range is used, not 0.1's


def test_train_config_reaches_the_data(tmp_path):
    """``reference_jitter`` (and the other sampling fields) of a run reach the dataset it trains on; out of
    range, the run is refused naming the field."""
    from training.loop import data_config
    cfg = TrainConfig(data=str(tmp_path), reference_jitter=0.0, augment=True, hflip=False, reference_size=32,
                      target_size=48, seed=4)
    assert data_config(cfg) == DataConfig(reference_size=32, target_size=48, augment=True, hflip=False,
                                          reference_jitter=0.0, seed=4)
    with pytest.raises(ValueError, match="reference_jitter"):
        TrainConfig(data=str(tmp_path), reference_jitter=1.0)
    with pytest.raises(ValueError, match="reference_jitter"):
        DataConfig(reference_jitter=-0.1)
