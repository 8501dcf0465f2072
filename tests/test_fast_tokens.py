"""Stamped token processing of S+ batches against a stand-in with ComfyUI's ``process_tokens`` contract
(the real one is compared in test_comfyui_text.py when COMFYUI_PATH is set)."""
import pytest
import torch

from benchmarks.comfy_runtime import extension

TABLE = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))


def comfy_like(rows, device, scale=1.0):
    """Per row: integer tokens looked up, tensor tokens inserted as embeddings; returns (embeds, attention
    mask, tokens per row, info on the last row's embeddings) as ComfyUI's SDClipModel.process_tokens does."""
    embeds, masks, counts = [], [], []
    for row in rows:
        info, vectors = [], []
        for position, token in enumerate(row):
            if isinstance(token, int):
                vectors.append(TABLE[token])
            else:
                vectors.append(token.float() * scale)
                info.append({"index": position})
        embeds.append(torch.stack(vectors))
        masks.append([1 if not isinstance(t, int) or t != 99 else 0 for t in row])
        counts.append(sum(masks[-1]))
    return torch.stack(embeds), torch.tensor(masks), counts, info


def rows_for(copies, sections, slots, vectors, extra=0):
    rows = []
    for g in range(copies):
        for s in range(sections):
            row = [1 + s, 5, 7, 99, 99, 99]
            for where, v in zip(slots, vectors):
                for section, position in where:
                    if section == s:
                        row[position] = v[g]
            rows.append(row)
    return rows + [[1, 99, 99, 99, 99, 99]] * extra


@pytest.mark.parametrize("copies,sections,extra", [(5, 1, 0), (4, 2, 0), (3, 2, 1)])
def test_stamped_rows_equal_per_row_processing(copies, sections, extra):
    StampedRows = extension("nodes.fast_tokens").StampedRows
    slots = [[(0, 2)], [(sections - 1, 1)]]
    torch.manual_seed(1)
    vectors = [torch.randn(copies, 8), torch.randn(copies, 8)]
    rows = rows_for(copies, sections, slots, vectors, extra)
    calls = []

    def original(rows, device):
        calls.append(len(rows))
        return comfy_like(rows, device)

    stamped = StampedRows(original, copies, sections, slots, vectors)(rows, "cpu")
    expected = comfy_like(rows, "cpu")
    assert calls == [sections, 2 * sections] + ([extra] if extra else [])
    torch.testing.assert_close(stamped[0], expected[0], rtol=0, atol=0)
    assert torch.equal(stamped[1], expected[1]) and stamped[2] == expected[2] and stamped[3] == expected[3]


def test_unexpected_processing_falls_back_to_every_row():
    StampedRows = extension("nodes.fast_tokens").StampedRows
    slots, vectors = [[(0, 2)]], [torch.randn(4, 8)]
    rows = rows_for(4, 1, slots, vectors)

    def scaling(rows, device):   # embeddings transformed at the slot: stamping cannot reproduce it
        return comfy_like(rows, device, scale=2.0)

    stamped = StampedRows(scaling, 4, 1, slots, vectors)
    out = stamped(rows, "cpu")
    torch.testing.assert_close(out[0], comfy_like(rows, "cpu", scale=2.0)[0], rtol=0, atol=0)
    assert stamped.fallbacks == 1


def test_stamped_rows_is_installed_only_inside_the_block():
    fast_tokens = extension("nodes.fast_tokens")

    class Encoder:
        def process_tokens(self, rows, device):
            return comfy_like(rows, device)

    class Clip:
        cond_stage_model = type("M", (), {"clip_l": Encoder()})()

    clip = Clip()
    with fast_tokens.stamped_rows(clip, 2, {"l": 1}, [[(0, 2)]], {"l": [torch.randn(2, 8)]}):
        assert isinstance(clip.cond_stage_model.clip_l.process_tokens, fast_tokens.StampedRows)
    assert "process_tokens" not in vars(clip.cond_stage_model.clip_l)
