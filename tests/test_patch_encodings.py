"""The sampling patch's per-run S+ encodings, without ComfyUI: a stand-in CLIP with ComfyUI's interface.

Checks that encoding a window of the schedule in one batched call gives the same encodings as one
call per timestep (the paper-exact mode), which sigmas a window holds, eviction, and the buckets.
"""
import pytest
import torch

from comfyui_customcontrast.nodes import encodings as encodings_module
from comfyui_customcontrast.nodes import patch as patch_module
from comfyui_customcontrast.nodes.text_encode import PlaceholderPrompt
from customcontrast_core import CustomContrastModel, get_preset


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
    prompt = PlaceholderPrompt(tokens={"l": [[(i + 1, 1.0) for i in range(77)]]}, slots=[[(0, 4)]],
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
    patch.start_run(SCHEDULE)
    return patch, looked_up


SCHEDULE = [9.0, 7.0, 5.0, 3.0, 1.0, 0.0]
CPU = torch.device("cpu")


def test_window_encodes_the_schedule_in_one_call_and_equals_one_call_per_timestep(monkeypatch):
    batched, looked_up = make_patch()
    first = batched.encodings(9.0, CPU)
    assert batched.encode_calls == 1 and sorted(batched.cache) == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert batched.clip.rows == [5 * 16]                          # 5 timesteps x 16 groups, one call
    later = [batched.encodings(s, CPU) for s in (7.0, 5.0, 3.0, 1.0)]
    assert batched.encode_calls == 1 and sorted(set(looked_up)) == [1.0, 3.0, 5.0, 7.0, 9.0]

    monkeypatch.setattr(encodings_module, "PROMPTS_PER_CALL", 1)
    single, _ = make_patch()
    for sigma, enc in zip((9.0, 7.0, 5.0, 3.0, 1.0), [first, *later]):
        ref = single.encodings(sigma, CPU)
        torch.testing.assert_close(enc.contexts, ref.contexts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.visual[0], ref.visual[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.blank_visual[0], ref.blank_visual[0], rtol=1e-5, atol=1e-5)
    assert single.encode_calls == 5 and all(rows == 16 for rows in single.clip.rows)
    assert (first.contexts - later[0].contexts).abs().max() > 1e-4   # timesteps really differ


def test_off_schedule_sigma_is_encoded_on_demand():
    patch, _ = make_patch()
    patch.encodings(9.0, CPU)
    patch.encodings(4.0, CPU)          # an intermediate evaluation (Heun, DPM++ 2S)
    assert patch.encode_calls == 2 and patch.clip.rows[-1] == 16       # only 4.0: the others are cached
    assert sorted(patch.cache) == [1.0, 3.0, 4.0, 5.0, 7.0, 9.0]


def test_later_runs_reuse_the_encodings_bit_for_bit():
    """A new run of the same patch (new seed, CFG or sampler on the same schedule) encodes nothing: the same
    tensors come back."""
    patch, _ = make_patch()
    first = {s: patch.encodings(s, CPU) for s in (9.0, 4.0, 7.0, 5.0, 3.0, 1.0)}
    assert patch.encode_calls == 2
    patch.start_run(SCHEDULE)
    again = {s: patch.encodings(s, CPU) for s in (9.0, 4.0, 7.0, 5.0, 3.0, 1.0)}
    assert patch.encode_calls == 0 and patch.clip.rows == [5 * 16, 16]
    assert all(again[s] is first[s] for s in first)


def test_beyond_the_limit_the_least_recently_used_encodings_are_evicted(monkeypatch):
    monkeypatch.setattr(encodings_module, "MAX_CACHED", 3)
    patch, _ = make_patch()
    first = patch.encodings(9.0, CPU)                            # a window is never evicted while it is made
    assert sorted(patch.cache) == [1.0, 3.0, 5.0, 7.0, 9.0]
    patch.encodings(4.0, CPU)                                    # one more: the three used longest ago go
    assert sorted(patch.cache) == [1.0, 4.0, 9.0] and patch.encode_calls == 2
    patch.encodings(1.0, CPU)                                    # a hit makes 1 the most recent
    patch.encodings(5.0, CPU)                                    # 5 and 3 encoded: 9 and 4 go, 1 stays
    assert sorted(patch.cache) == [1.0, 3.0, 5.0] and patch.encode_calls == 3
    again = patch.encodings(9.0, CPU)                            # re-encoded with the window behind it
    assert patch.encode_calls == 4 and sorted(patch.cache) == [5.0, 7.0, 9.0]
    torch.testing.assert_close(again.contexts, first.contexts, rtol=1e-5, atol=1e-5)


def test_window_skips_sigmas_outside_the_active_range():
    patch, _ = make_patch(sigma_start=7.0, sigma_end=3.0)
    patch.encodings(7.0, CPU)
    assert sorted(patch.cache) == [3.0, 5.0, 7.0]


@pytest.mark.parametrize("buckets,expected", [(1, [-1.0]), (2, [-2.0, -1.0])])
def test_buckets_encode_once_per_bucket(buckets, expected):
    patch, _ = make_patch(splus_buckets=buckets)
    for sigma in (9.0, 7.0, 5.0, 3.0, 1.0):                       # timesteps 900 ... 100
        patch.encodings(sigma, CPU)
    assert sorted(patch.cache) == expected and patch.encode_calls == len(expected)


def test_window_helper():
    window = encodings_module.window
    assert window(5.0, [9.0, 7.0, 5.0, 3.0, 1.0, 0.0], lambda s: True, 3) == [5.0, 3.0, 1.0]
    assert window(5.0, [], lambda s: True, 3) == [5.0]
    assert window(5.0, [5.0, 3.0, 1.0], lambda s: s != 3.0, 10) == [5.0, 1.0]


def test_timesteps_reach_the_encoder_in_fp32_whatever_its_dtype(monkeypatch):
    """A bf16 checkpoint (kept bf16 by the Loader) must not round the timestep: bf16 holds 813.37 as 812."""
    patch, _ = make_patch()
    patch.model.to(torch.bfloat16)
    patch.images = None   # re-encoded from the (now bf16) model's image features
    seen = []
    original = patch.model.encoder.encode_timestep

    def spy(image, timesteps):
        seen.append(timesteps)
        return original(image, timesteps)
    monkeypatch.setattr(patch.model.encoder, "encode_timestep", spy)
    patch.encodings(8.1337, torch.device("cpu"))
    assert seen and all(t.dtype == torch.float32 for t in seen)
    assert float(seen[0][0]) == pytest.approx(813.37, abs=1e-3)
