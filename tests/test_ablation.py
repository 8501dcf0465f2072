"""View-invariance metrics on hand-built embeddings, and the --quick ablation pipeline."""
import json

import pytest
import torch

from training.eval.retrieval import distance_ratio, mean_average_precision, pca_2d, top1_same_subject

LABELS = torch.tensor([0, 0, 1, 1])


def test_perfectly_clustered_views():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert top1_same_subject(emb, LABELS) == 1.0
    assert mean_average_precision(emb, LABELS) == 1.0
    assert distance_ratio(emb, LABELS) < 0.05


def test_views_clustered_by_pose_not_subject():
    # view 0 of both subjects point one way, view 1 the other: retrieval finds the wrong subject
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.05, 0.95]])
    assert top1_same_subject(emb, LABELS) == 0.0
    # subject 0's views find their partner 3rd of 3 (AP 1/3); subject 1's 2nd of 3 (AP 1/2)
    assert mean_average_precision(emb, LABELS) == pytest.approx(5 / 12)
    assert distance_ratio(emb, LABELS) > 1


def test_known_distance_ratio():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert distance_ratio(emb, LABELS) == pytest.approx(0.0)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    # intra: cos distance 1 for both pairs; inter: pairs (0,2),(0,3),(1,2),(1,3) -> 2, 1, 1, 2 -> mean 1.5
    assert distance_ratio(emb, LABELS) == pytest.approx(1 / 1.5)
    assert pca_2d(torch.randn(6, 3, 4)).shape == (6, 2)


def test_quick_pipeline(tmp_path):
    from training import ablation

    path = ablation.main(["--quick", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    assert set(report["summary"]) == {"none", "cscl", "macl", "both"}
    for variant in report["summary"].values():
        for space in ("splus", "cls"):
            assert 0 <= variant[space]["top1"]["mean"] <= 1 and 0 <= variant[space]["mAP"]["mean"] <= 1
    assert (tmp_path / "ablation.md").read_text().startswith("| variant |")
    assert (tmp_path / "pca_both.png").is_file()
