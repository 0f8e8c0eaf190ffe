"""The merge formulas against the independent numpy reference (tests/reference.py)."""

import numpy as np
import pytest
import torch

from mergekit_multimodal.methods.mmer.masks import pack_mask, unpack_mask
from mergekit_multimodal.methods import get_method
from tests import reference


def _inputs(seed=0, n=3, shape=(7, 5)):
    g = np.random.default_rng(seed)
    base = g.normal(size=shape)
    sources = [base + 0.1 * g.normal(size=shape) for _ in range(n)]
    return base, sources


def _params(method, **shared):
    m = get_method(method)
    p = m.resolve("x", 0.0, shared, [{}] * 3)
    return m, p


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"election": "ties", "density": 0.5},
        {"election": "ties", "density": 0.2, "alpha": 0.7},
        {"lambda": 0.5},
        {"lambda": 2.0, "mask": "l1"},
        {"mask": "sign", "rescale": True},
        {"rescale": True},
    ],
)
def test_mmer_matches_reference(kw):
    base, sources = _inputs()
    m, p = _params("mmer", **kw)
    out = m.merge(torch.tensor(base), [torch.tensor(s) for s in sources], p)
    ref_kw = {"lam" if k == "lambda" else k: v for k, v in kw.items()}
    merged, tau_star, masks, scales = reference.mmer(base, sources, **ref_kw)
    np.testing.assert_allclose(out.merged.numpy(), merged, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.routes.task_vector.numpy(), tau_star, rtol=1e-12, atol=1e-12)
    for got, want in zip(out.routes.masks, masks):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_allclose(out.routes.scales, scales, rtol=1e-9)


def test_mmer_single_source_route_is_the_source():
    base, sources = _inputs(n=1)
    m, p = _params("mmer")
    out = m.merge(torch.tensor(base), [torch.tensor(sources[0])], p)
    assert out.routes.masks[0].all()
    np.testing.assert_allclose(out.merged.numpy(), sources[0], atol=1e-12)
    route = base + out.routes.scales[0] * out.routes.masks[0].numpy() * out.routes.task_vector.numpy()
    np.testing.assert_allclose(route, sources[0], atol=1e-12)


def test_mmer_route_is_closer_to_its_source_than_the_merge():
    """The point of the masks: theta_base + m_i * tau_* is nearer theta_i than the merged weights."""
    base, sources = _inputs(seed=3, n=4, shape=(64, 64))
    m, p = _params("mmer")
    out = m.merge(torch.tensor(base), [torch.tensor(s) for s in sources], p)
    tau = out.routes.task_vector.numpy()
    for s, mask in zip(sources, out.routes.masks):
        route = base + mask.numpy() * tau
        assert np.abs(route - s).sum() < np.abs(out.merged.numpy() - s).sum()


def test_naive_mc_matches_reference():
    base, sources = _inputs()
    m = get_method("naive_mc")
    p = m.resolve("x", 0.0, {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}])
    out = m.merge(None, [torch.tensor(s) for s in sources], p)
    np.testing.assert_allclose(out.merged.numpy(), reference.naive_mc(sources, [1, 2, 3]), rtol=1e-12)
    assert out.routes is None


def test_mergekit_linear_through_adapter_matches_reference():
    base, sources = _inputs()
    m = get_method("linear")
    p = m.resolve("x", 0.0, {}, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}])
    out = m.merge(torch.tensor(base), [torch.tensor(s) for s in sources], p)
    np.testing.assert_allclose(out.merged.numpy(), reference.naive_mc(sources, [1, 1, 2]), rtol=1e-6)


def test_mergekit_task_arithmetic_uses_the_base():
    base, sources = _inputs()
    m = get_method("task_arithmetic")
    p = m.resolve("x", 0.0, {}, [{"weight": 0.5}] * 3)
    out = m.merge(torch.tensor(base), [torch.tensor(s) for s in sources], p)
    want = base + 0.5 * sum(s - base for s in sources)
    np.testing.assert_allclose(out.merged.numpy(), want, rtol=1e-6, atol=1e-9)


def test_parameter_gradient_and_filter_follow_mergekit_semantics():
    m = get_method("mmer")
    assert m.resolve("model.layers.0.x", 0.0, {"alpha": [0.0, 1.0]}, [{}]).shared["alpha"] == 0.0
    assert m.resolve("model.layers.3.x", 1.0, {"alpha": [0.0, 1.0]}, [{}]).shared["alpha"] == 1.0
    cond = [{"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert m.resolve("model.layers.0.mlp.up_proj.weight", 0.0, {"alpha": cond}, [{}]).shared["alpha"] == 0.3
    assert m.resolve("model.layers.0.self_attn.q_proj.weight", 0.0, {"alpha": cond}, [{}]).shared["alpha"] == 0.9


@pytest.mark.parametrize("shape", [(1,), (3,), (8,), (5, 7), (2, 3, 5)])
def test_mask_packing_roundtrip_and_bit_layout(shape):
    g = np.random.default_rng(1)
    mask = torch.tensor(g.random(shape) > 0.5)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    # bit i of the flattened mask is bit (i % 8) of byte i // 8 (documented in docs/format.md)
    flat = mask.flatten().tolist()
    for i, bit in enumerate(flat):
        assert ((int(packed[i // 8]) >> (i % 8)) & 1) == int(bit)


@pytest.mark.parametrize("n,k", [(200_000, 1), (200_000, 100_000), (200_000, 199_999), (300_001, 12345)])
def test_kth_largest_radix_select_is_exact(n, k):
    from mergekit_multimodal.methods.mmer import kth_largest

    g = torch.Generator().manual_seed(n + k)
    values = torch.randn(n, generator=g).abs()
    values[:1000] = values[1000:2000]  # duplicates
    assert kth_largest(values, k) == float(np.sort(values.numpy())[::-1][k - 1])
    # deltas of bf16 weights: few distinct values, one high-bits bin holds most of them
    base = torch.randn(n, generator=g).bfloat16()
    quantized = ((base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16().float() - base.float()).abs()
    assert kth_largest(quantized, k) == float(np.sort(quantized.numpy())[::-1][k - 1])
