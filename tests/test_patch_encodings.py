"""The sampling patch's per-run S+ encodings, without ComfyUI: a stand-in CLIP with ComfyUI's interface.

Checks that encoding a window of the schedule in one batched call gives the same encodings as one
call per timestep (the paper-exact mode), which sigmas a window holds, eviction, and the buckets.
"""
import pytest
import torch

from benchmarks.comfy_runtime import extension
from customcontrast_core import CustomContrastModel, get_preset

patch_module = extension("nodes.patch")


class StandInClip:
    """encode_from_tokens like ComfyUI's CLIP: sections of (token, weight) pairs -> (1, 77*S, D), causal."""

    def __init__(self, width: int) -> None:
        self.table = torch.randn(1000, width, generator=torch.Generator().manual_seed(7))
        self.rows = []   # sections per call

    def encode_from_tokens(self, tokens, return_pooled=False):
        sections = tokens["l"]
        self.rows.append(len(sections))
        out = [torch.cumsum(torch.stack([t if torch.is_tensor(t) else self.table[t % 1000]
                                         for t, *_ in section]).float(), dim=0) for section in sections]
        cond = torch.cat(out)[None]
        return (cond, cond[:, 0]) if return_pooled else cond


def make_patch(**settings):
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = CustomContrastModel(config).eval()
    prompt = patch_module.PlaceholderPrompt(tokens={"l": [[(i + 1, 1.0) for i in range(77)]]}, slots=[[(0, 4)]],
                                            base="sd15", widths=config.token_widths)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, len(config.clip_layers), 5, config.clip_width, generator=g)
    looked_up = []

    def timestep_of(sigma):
        looked_up.append(float(sigma.reshape(-1)[0]))
        return sigma * 100
    patch = patch_module.SubjectPatch(
        model=model, clip=StandInClip(config.token_widths[0]), subjects=[hidden], blank=torch.zeros_like(hidden),
        prompt=prompt, base_context=torch.zeros(1, 77, config.context_dim),
        layers={layer.comfy_key: layer for layer in config.layers},
        settings=patch_module.ApplySettings(**settings), timestep_of=timestep_of)
    return patch, looked_up


SCHEDULE = {"sample_sigmas": torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0])}


def test_window_encodes_the_schedule_in_one_call_and_equals_one_call_per_timestep(monkeypatch):
    batched, looked_up = make_patch()
    first = batched.encodings(9.0, torch.device("cpu"), SCHEDULE)
    assert batched.encode_calls == 1 and sorted(batched.cache) == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert batched.clip.rows == [5 * 16]                          # 5 timesteps x 16 groups, one call
    later = [batched.encodings(s, torch.device("cpu"), SCHEDULE) for s in (7.0, 5.0, 3.0, 1.0)]
    assert batched.encode_calls == 1 and sorted(looked_up) == [1.0, 3.0, 5.0, 7.0, 9.0]

    monkeypatch.setattr(patch_module, "PROMPTS_PER_CALL", 1)
    single, _ = make_patch()
    for sigma, enc in zip((9.0, 7.0, 5.0, 3.0, 1.0), [first, *later]):
        ref = single.encodings(sigma, torch.device("cpu"), SCHEDULE)
        torch.testing.assert_close(enc.contexts, ref.contexts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.visual[0], ref.visual[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.blank_visual[0], ref.blank_visual[0], rtol=1e-5, atol=1e-5)
    assert single.encode_calls == 5 and all(rows == 16 for rows in single.clip.rows)
    assert (first.contexts - later[0].contexts).abs().max() > 1e-4   # timesteps really differ


def test_off_schedule_sigma_is_encoded_on_demand():
    patch, _ = make_patch()
    patch.encodings(9.0, torch.device("cpu"), SCHEDULE)
    patch.encodings(4.0, torch.device("cpu"), SCHEDULE)          # an intermediate evaluation (Heun, DPM++ 2S)
    assert patch.encode_calls == 2 and patch.clip.rows[-1] == 16       # only 4.0: the others are cached
    assert sorted(patch.cache) == [1.0, 3.0, 4.0, 5.0, 7.0, 9.0]


def test_later_runs_reuse_the_encodings_and_drop_those_the_last_two_runs_did_not_use():
    patch, _ = make_patch()
    cpu = torch.device("cpu")
    patch.reset()
    first = {s: patch.encodings(s, cpu, SCHEDULE) for s in (9.0, 4.0, 7.0, 5.0, 3.0, 1.0)}
    assert patch.encode_calls == 2
    patch.reset()                                                # a new seed on the same schedule
    again = {s: patch.encodings(s, cpu, SCHEDULE) for s in (9.0, 4.0, 7.0, 5.0, 3.0, 1.0)}
    assert patch.encode_calls == 0 and patch.clip.rows == [5 * 16, 16]
    assert all(again[s] is first[s] for s in first)
    patch.reset()                                                # a shorter schedule: 9 and 5 are kept
    short = {"sample_sigmas": torch.tensor([9.0, 5.0, 0.0])}
    patch.encodings(9.0, cpu, short)
    patch.encodings(5.0, cpu, short)
    assert patch.encode_calls == 0 and sorted(patch.cache) == [1.0, 3.0, 4.0, 5.0, 7.0, 9.0]
    patch.reset()                                                # the last two runs used every entry
    assert sorted(patch.cache) == [1.0, 3.0, 4.0, 5.0, 7.0, 9.0]
    patch.reset()                                                # what neither of the last two used is gone
    assert sorted(patch.cache) == [5.0, 9.0] and patch.recent.runs == 5
    torch.testing.assert_close(patch.encodings(5.0, cpu, short).contexts, first[5.0].contexts, rtol=0, atol=0)


def test_beyond_the_limit_the_least_recently_used_encodings_are_evicted(monkeypatch):
    monkeypatch.setattr(extension("nodes.encodings"), "MAX_CACHED", 3)
    patch, _ = make_patch()
    cpu = torch.device("cpu")
    first = patch.encodings(9.0, cpu, SCHEDULE)                   # a window is never evicted while it is made
    assert sorted(patch.cache) == [1.0, 3.0, 5.0, 7.0, 9.0]
    patch.encodings(4.0, cpu, SCHEDULE)                           # 9, 7, 5 were used (encoded) longest ago
    assert sorted(patch.cache) == [1.0, 3.0, 4.0] and patch.encode_calls == 2
    again = patch.encodings(9.0, cpu, SCHEDULE)                   # re-encoded with the window behind it
    assert patch.encode_calls == 3 and sorted(patch.cache) == [5.0, 7.0, 9.0]
    torch.testing.assert_close(again.contexts, first.contexts, rtol=1e-5, atol=1e-5)


def test_a_window_is_prepared_for_the_unet_in_one_transfer():
    patch, _ = make_patch()
    cpu = torch.device("cpu")
    enc = patch.encodings(9.0, cpu, SCHEDULE, prepare=(154, torch.float16))
    for sigma in (9.0, 7.0, 5.0, 3.0, 1.0):
        other = patch.cache[sigma]
        ready = other.prepared[(cpu, 154, torch.float16)]     # made by the window's one copy
        assert ready.shape == (16, 154, other.contexts.shape[-1]) and ready.dtype == torch.float16
        assert other.contexts_for(cpu, 154, torch.float16) is ready
        expected = other.contexts.to(torch.float16).repeat(1, 2, 1)
        torch.testing.assert_close(ready, expected, rtol=0, atol=0)
    assert enc.contexts.dtype == torch.float32                 # the encoder's output is kept as it came


def test_window_skips_sigmas_outside_the_active_range():
    patch, _ = make_patch(sigma_start=7.0, sigma_end=3.0)
    patch.encodings(7.0, torch.device("cpu"), SCHEDULE)
    assert sorted(patch.cache) == [3.0, 5.0, 7.0]


@pytest.mark.parametrize("buckets,expected", [(1, [-1.0]), (2, [-2.0, -1.0])])
def test_buckets_encode_once_per_bucket(buckets, expected):
    patch, _ = make_patch(splus_buckets=buckets)
    for sigma in (9.0, 7.0, 5.0, 3.0, 1.0):                       # timesteps 900 ... 100
        patch.encodings(sigma, torch.device("cpu"), SCHEDULE)
    assert sorted(patch.cache) == expected and patch.encode_calls == len(expected)


def test_window_helper():
    window = extension("nodes.encodings").window
    assert window(5.0, [9.0, 7.0, 5.0, 3.0, 1.0, 0.0], lambda s: True, 3) == [5.0, 3.0, 1.0]
    assert window(5.0, [], lambda s: True, 3) == [5.0]
    assert window(5.0, [5.0, 3.0, 1.0], lambda s: s != 3.0, 10) == [5.0, 1.0]


def test_timesteps_reach_the_encoder_in_fp32_whatever_its_dtype(monkeypatch):
    """A bf16 checkpoint (kept bf16 by the Loader) must not round the timestep: bf16 holds 813.37 as 812."""
    patch, _ = make_patch()
    patch.model.to(torch.bfloat16)
    patch._images = patch._blank = None   # re-encoded from the (now bf16) model's image features
    seen = []
    original = patch.model.encoder.encode_timestep

    def spy(image, timesteps):
        seen.append(timesteps)
        return original(image, timesteps)
    monkeypatch.setattr(patch.model.encoder, "encode_timestep", spy)
    patch.encodings(8.1337, torch.device("cpu"))
    assert seen and all(t.dtype == torch.float32 for t in seen)
    assert float(seen[0][0]) == pytest.approx(813.37, abs=1e-3)
