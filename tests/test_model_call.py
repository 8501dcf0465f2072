"""Which chunks of a UNet call one Apply node patches (``nodes/model_call.py``), without ComfyUI: the decision
table."""
import pytest

from comfyui_customcontrast.nodes.model_call import patched_chunks


@pytest.mark.parametrize("chunks, swapped, matched, expected", [
    ((1, 0), (1,), True, (0, 1)),      # the usual batch: negative and the node's positive
    ((1, 0), (), True, (0,)),          # negative batched with another prompt, the node's positive seen this run
    ((1, 0), (), None, ()),            # nothing known yet and a foreign prompt: leave the batch alone
    ((1, 0), (), False, ()),           # the run's positive is not this node's: nothing patched
    ((1,), (), None, (0,)),            # uncond alone (ComfyUI split the call), before any cond chunk
    ((1,), (), False, ()),
    ((0, 1, 0), (2,), True, (1, 2)),   # a foreign cond chunk stays unpatched next to the node's own
])
def test_patched_chunks(chunks, swapped, matched, expected):
    assert patched_chunks(chunks, swapped, matched) == expected
