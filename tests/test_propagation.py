"""Masks carried from one evaluation to the next, keyed on sigma (Sec. 3.4)."""
import pytest
import torch

from customcontrast_core.attention import SubjectMaps
from customcontrast_core.masks import MaskConfig
from customcontrast_core.propagation import MaskTracker, subject_location


def blob_maps(center, grid=(8, 8), batch=1):
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    blob = torch.exp(-((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / 4.0).flatten()
    text = blob.expand(batch, -1) * 0.3
    visual = (blob / blob.sum()).expand(batch, -1)
    return SubjectMaps(text=text, visual=visual)


def test_first_evaluation_has_no_mask_and_next_step_gets_it():
    tracker = MaskTracker(MaskConfig(mode="topk", topk_ratio=1 / 64))
    tracker.begin(14.6)
    assert tracker.mask_for(14.6) is None
    tracker.add(0, blob_maps((2, 5)), (8, 8))
    tracker.begin(7.0)                       # next step: the maps of sigma 14.6 become its mask
    (mask,) = tracker.mask_for(7.0)
    assert mask.shape == (1, 8, 8)
    assert mask[0, 2, 5] == 1 and mask.sum() == 1
    tracker.add(0, blob_maps((6, 1)), (8, 8))
    tracker.begin(3.0)
    assert tracker.mask_for(3.0)[0][0, 6, 1] == 1   # the closest earlier evaluation wins


def test_asking_for_the_mask_before_begin_gives_the_previous_evaluations_mask():
    """A sampler that asks for the step's mask before ``begin`` (as the evaluation's sampler does) gets the mask of
    the step just before, not of two steps before. Fails when mask_for only sees finalised evaluations."""
    tracker = MaskTracker(MaskConfig(mode="topk", topk_ratio=1 / 64))
    assert tracker.mask_for(14.6) is None
    tracker.begin(14.6)
    tracker.add(0, blob_maps((2, 5)), (8, 8))
    (mask,) = tracker.mask_for(7.0)                       # sigma 14.6's maps, still pending
    assert mask[0, 2, 5] == 1 and mask.sum() == 1
    tracker.begin(7.0)
    assert tracker.mask_for(7.0)[0][0, 2, 5] == 1        # asked after begin: the same mask
    tracker.add(0, blob_maps((6, 1)), (8, 8))
    assert tracker.mask_for(7.0)[0][0, 2, 5] == 1        # the evaluation being recorded is not its own mask
    assert tracker.mask_for(3.0)[0][0, 6, 1] == 1


def test_heun_like_repeated_and_intermediate_sigmas():
    tracker = MaskTracker(MaskConfig(mode="topk", topk_ratio=1 / 64))
    for sigma, center in [(10.0, (1, 1)), (5.0, (4, 4)), (5.0, (4, 4)), (2.0, (7, 7))]:
        tracker.begin(sigma)
        tracker.add(0, blob_maps(center), (8, 8))
    tracker.begin(1.0)
    assert tracker.mask_for(10.0) is None
    assert tracker.mask_for(9.0)[0][0, 1, 1] == 1
    assert tracker.mask_for(5.0)[0][0, 1, 1] == 1    # the second evaluation at sigma 5 still uses sigma 10's
    assert tracker.mask_for(1.5)[0][0, 7, 7] == 1
    assert [s for s, _ in tracker.history()] == [10.0, 5.0, 2.0]


def test_maps_of_several_layers_and_grids_are_averaged():
    tracker = MaskTracker(MaskConfig(mode="soft", threshold=0.2), num_subjects=2)
    tracker.begin(3.0)
    tracker.add(0, blob_maps((2, 2), grid=(8, 8)), (8, 8))
    tracker.add(0, blob_maps((1, 1), grid=(4, 4)), (4, 4))
    tracker.add(1, blob_maps((6, 6), grid=(8, 8)), (8, 8))
    tracker.begin(1.0)
    first, second = tracker.mask_for(1.0)
    assert first.shape == second.shape == (1, 8, 8)
    assert first[0, 2:4, 2:4].min() > 0.5 and first[0, 7, 7] == 0
    assert second[0, 6, 6] == 1 and second[0, 0, 0] == 0


def test_constant_maps_give_no_nan():
    tracker = MaskTracker(MaskConfig())
    tracker.begin(2.0)
    tracker.add(0, SubjectMaps(text=torch.full((2, 16), 0.1), visual=torch.full((2, 16), 1 / 16)), (4, 4))
    tracker.begin(1.0)
    (mask,) = tracker.mask_for(1.0)
    assert torch.isfinite(mask).all() and mask.shape == (2, 4, 4)


def test_subject_location_balances_scales():
    text = torch.zeros(1, 2, 2)
    text[0, 0, 0] = 0.9
    visual = torch.full((1, 2, 2), 0.1)
    visual[0, 1, 1] = 0.7
    loc = subject_location(text, visual)
    torch.testing.assert_close(loc[0, 0, 0], loc[0, 1, 1])   # equal weight after normalisation


def test_summed_layers_equal_per_layer_adds_and_the_mean_of_resized_maps():
    """add(maps, grid, layers=n) with the sum of n layers' maps gives the per-layer result, which is the mean
    over layers of the maps resized to the largest grid (the resize is linear, so sums are resized once)."""
    from customcontrast_core.masks import combine_maps, make_mask

    torch.manual_seed(0)
    layers = [(torch.rand(2, 64), torch.rand(2, 64), (8, 8)) for _ in range(3)] + \
             [(torch.rand(2, 16), torch.rand(2, 16), (4, 4)) for _ in range(2)]
    per_layer, summed = MaskTracker(MaskConfig()), MaskTracker(MaskConfig())
    for tracker in (per_layer, summed):
        tracker.begin(2.0)
    for text, visual, grid in layers:
        per_layer.add(0, SubjectMaps(text=text, visual=visual), grid)
    for grid in ((8, 8), (4, 4)):
        group = [(t, v) for t, v, g in layers if g == grid]
        summed.add(0, SubjectMaps(text=sum(t for t, _ in group), visual=sum(v for _, v in group)), grid,
                   layers=len(group))
    grids = [g for _, _, g in layers]
    expected = make_mask(subject_location(combine_maps([t for t, _, _ in layers], grids, (8, 8)),
                                          combine_maps([v for _, v, _ in layers], grids, (8, 8))), MaskConfig())
    for tracker in (per_layer, summed):
        tracker.begin(1.0)
        torch.testing.assert_close(tracker.mask_for(1.0)[0], expected, rtol=1e-5, atol=1e-6)
