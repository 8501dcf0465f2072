"""CUDA-graph mode of the sampling patch: same layers as the eager patch, static-buffer bookkeeping, capture rules.

On the CPU ``StaticCall`` emulates replay (the function re-runs on the static inputs and its results are
copied into the static outputs), which exercises everything but the CUDA capture itself; the CUDA tests
run where a GPU is present.
"""
import pytest
import torch

from benchmarks.bench_layer_overhead import layer_outputs as _run
from customcontrast_core.graphs import CaptureError, StaticCall, copy_into

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family,use_mask,subjects", [("sd15", True, 1), ("sd15", False, 1), ("sdxl", True, 1),
                                                      ("sd15", True, 2)])
def test_emulated_graphs_give_the_eager_layers_and_masks(family, use_mask, subjects):
    sigmas = (9.0, 8.0, 7.0, 6.0, 5.0)
    eager, config, expected, _ = _run(family, use_mask, sigmas, subjects=subjects)
    graphed, _, outputs, captures = _run(family, use_mask, sigmas, graphs="emulate", subjects=subjects)
    assert len(outputs) == len(expected) == len(sigmas) * len(config.layers)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layers = len(config.layers)
    # one graph per layer for the first evaluation (M = 1) and one for the masked ones, then only replays
    assert captures == ([layers, 2 * layers, 2 * layers, 2 * layers, 2 * layers] if use_mask else [layers] * 5)
    eager.finish()
    graphed.finish()   # hands the last evaluation's map sums to the tracker
    assert len(graphed.last_masks) == len(eager.last_masks) == (len(sigmas) if use_mask else 0)
    for (s_eager, m_eager), (s_graph, m_graph) in zip(eager.last_masks, graphed.last_masks):
        assert s_eager == s_graph and len(m_graph) == len(m_eager) == subjects
        for subject in range(subjects):
            torch.testing.assert_close(m_graph[subject], m_eager[subject], rtol=1e-5, atol=1e-5)


def test_emulated_graphs_with_two_evaluations_at_one_sigma_give_the_eager_masks():
    """Two evaluations at the same sigma with different latents (a sampler that evaluates a sigma twice, or cond
    and uncond in separate batches) add to the same pending maps; the graph mode's accumulators are then copied
    when handed over, since the next evaluation rewrites them before the tracker sums them."""
    from benchmarks.bench_layer_overhead import _evaluation, _patch

    sigmas = (9.0, 8.0, 8.0, 7.0, 6.0)
    results = []
    for graphs in ("off", "emulate"):
        torch.manual_seed(0)
        patch, config, base = _patch("sd15", True, graphs=graphs)
        outputs = []
        for call, sigma in enumerate(sigmas):
            torch.manual_seed(call)                      # each evaluation its own latents
            _evaluation(patch, config, base, sigma, outputs=outputs)
        patch.finish()
        results.append((patch.last_masks, outputs))
    (eager_masks, expected), (graph_masks, got) = results
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert [s for s, _ in graph_masks] == [s for s, _ in eager_masks] == [9.0, 8.0, 7.0, 6.0]
    for (_, m_eager), (_, m_graph) in zip(eager_masks, graph_masks):
        torch.testing.assert_close(m_graph[0], m_eager[0], rtol=1e-5, atol=1e-5)


def test_graph_outputs_are_static_tensors_refilled_at_each_call():
    static = torch.zeros(3)
    call = StaticCall(lambda: (static * 2 + 1,), (static,), emulate=True)
    first = call(torch.tensor([1.0, 2.0, 3.0]))[0]
    assert first.tolist() == [3.0, 5.0, 7.0]
    second = call(torch.tensor([0.0, 0.5, 1.0]))[0]
    assert second is first and first.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        call(torch.zeros(4))


def test_static_inputs_are_filled_by_one_foreach_copy_when_they_share_dtype_and_layout():
    """q, k, v of one dtype and layout: one ``_foreach_copy_`` (one launch on CUDA); another dtype: a copy each;
    a value that is its static tensor already: nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    statics = [torch.zeros(2, 6, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    values = [torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    with Ops() as ops:
        copy_into(statics, values)
    assert ops.names == ["aten::_foreach_copy_"] and all(torch.equal(a, b) for a, b in zip(statics, values))
    mixed = [torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(2, 3, 4)]
    with Ops() as ops:
        copy_into(mixed, [values[1], values[2]])
    assert ops.names == ["aten::copy_", "aten::copy_"] and torch.equal(mixed[1], values[2])
    with Ops() as ops:
        copy_into(statics, [statics[0], values[1], statics[2]])
    assert ops.names == ["aten::copy_"]


def test_host_reads_inside_a_graph_are_refused():
    static = torch.ones(2)
    with pytest.raises(CaptureError, match="_local_scalar_dense"):
        StaticCall(lambda: (static * float(static.sum()),), (static,), emulate=True)(torch.ones(2))
    with pytest.raises(CaptureError, match="CUDA tensors"):
        StaticCall(lambda: (static,), (static,))


def test_capture_failure_falls_back_to_eager_for_that_layer(monkeypatch):
    from benchmarks.comfy_runtime import extension

    graphed = extension("nodes.graphed")

    def refuse(*args, **kwargs):
        raise CaptureError("refused")

    monkeypatch.setattr(graphed, "StaticCall", refuse)
    sigmas = (9.0, 8.0)
    _, _, expected, _ = _run("sd15", True, sigmas)
    patch, _, outputs, captures = _run("sd15", True, sigmas, graphs="emulate")
    assert captures == [0, 0] and all(call is None for call in patch.graphs.calls.values())
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_graph_replays_the_function():
    static = torch.zeros(1024, device="cuda")
    call = StaticCall(lambda: (torch.softmax(static, 0) * 3,), (static,))
    for seed in range(3):
        x = torch.randn(1024, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        torch.testing.assert_close(call(x)[0], torch.softmax(x, 0) * 3)


@cuda
@pytest.mark.parametrize("family,use_mask", [("sd15", True), ("sdxl", True), ("sd15", False)])
def test_cuda_graphs_give_the_eager_layers(family, use_mask):
    sigmas = (9.0, 8.0, 7.0, 6.0)
    _, config, expected, _ = _run(family, use_mask, sigmas, "cuda")
    patch, _, outputs, captures = _run(family, use_mask, sigmas, "cuda", "cuda")
    assert all(call is not None for call in patch.graphs.calls.values())
    assert captures[-1] == captures[-2] > 0
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graphs_beyond_the_limit_start_afresh_with_the_same_results(monkeypatch):
    from benchmarks.comfy_runtime import extension

    monkeypatch.setattr(extension("nodes.graphed"), "MAX_GRAPHS", 20)   # fewer than one masked evaluation's 16 + 16
    sigmas = (9.0, 8.0, 7.0, 6.0)
    _, _, expected, _ = _run("sd15", True, sigmas)
    patch, _, outputs, captures = _run("sd15", True, sigmas, graphs="emulate")
    # 16 first-step graphs, then 16 masked ones (32 > 20): evaluation 3 starts afresh, evaluation 4 replays
    assert captures == [16, 32, 48, 48]
    assert len(patch.graphs.calls) == 16
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
