"""The companion loader against the source models' own transformers classes on the same inputs."""

import math

import numpy as np
import pytest
import torch
import transformers

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.runtime import CompositeModel
from mergekit_multimodal.methods.mmer import RouteDelta, pack_mask
from mergekit_multimodal.runtime.routing import RouteState, RoutedLinear, RoutedModule, cache_budget
from tests.helpers import DEVICE, DTYPE, MODALITY, assert_like_source, composite_config

V0 = 96
MEDIA_TOKENS = {"llava": 4, "qwen2_audio": 8, "video_llava": 2 * 5}  # features per item for the inputs below


def media_for(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "llava":
        return {"pixel_values": torch.randn(1, 3, 28, 28, generator=g)}
    if kind == "qwen2_audio":
        return {"input_features": torch.randn(1, 8, 32, generator=g), "feature_attention_mask": torch.ones(1, 32, dtype=torch.long)}
    if kind == "video_llava":
        return {"pixel_values_videos": torch.randn(1, 2, 3, 28, 28, generator=g)}
    raise KeyError(kind)


def source_logits(family, kind, text="w1 w2 {ph} w3 w4", device="cpu", dtype=torch.float32):
    """The source MLLM's own forward, with its placeholder expanded as its processor would."""
    path = family.sources[kind]
    cls = getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ph = {"llava": "<image>", "qwen2_audio": "<|AUDIO|>", "video_llava": "<video>"}[kind]
    ids = tok(text.format(ph=" ".join([ph] * MEDIA_TOKENS[kind])), return_tensors="pt").input_ids
    media = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in media_for(kind).items()}
    with torch.no_grad():
        return model(input_ids=ids.to(device), **media).logits


def composite_logits(model, path, kind, modality, text="w1 w2 {ph} w3 w4"):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ph = model.manifest.modalities[modality].placeholder
    ids = tok(text.format(ph=ph), return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, media={modality: media_for(kind)}).logits


@pytest.mark.parametrize("kind", ["llava", "qwen2_audio", "video_llava"])
def test_single_source_mmer_composite_reproduces_the_source(family, tmp_path, kind):
    out = compose(composite_config(family, "mmer", [kind]), str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out, device=DEVICE, torch_dtype=DTYPE)
    got = composite_logits(model, out, kind, MODALITY[kind])
    assert_like_source(got, lambda device, dtype: source_logits(family, kind, device=device, dtype=dtype), V0)


def test_naive_mc_of_identical_sources_reproduces_the_source(family, tmp_path):
    cfg = composite_config(family, "naive_mc", ["llava"])
    cfg["models"].append({"model": str(family.sources["llava"]), "modality": "image2", "placeholder": "<image2>"})
    out = compose(cfg, str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out)
    torch.testing.assert_close(composite_logits(model, out, "llava", "image")[..., :V0],
                               source_logits(family, "llava")[..., :V0], rtol=1e-4, atol=1e-4)


def test_mmer_routes_are_closer_to_each_source_than_naive_mc(family, tmp_path, capsys):
    """Each source's single-modality prompt through its MMER route (the whole input on that route)
    is closer to the source model than the NaiveMC composite. Per-token routing (text tokens on the
    merged weights) is reported alongside: see docs/methods.md on the text route."""
    kinds = ["llava", "qwen2_audio", "video_llava"]
    outs = {m: compose(composite_config(family, m, kinds), str(tmp_path / m)) for m in ("mmer", "naive_mc")}
    models = {m: CompositeModel.from_pretrained(p) for m, p in outs.items()}
    report = []
    for kind in kinds:
        want = source_logits(family, kind)[..., :V0]

        def dist(m, whole=False):
            with models[m].route(MODALITY[kind] if whole else None):
                got = composite_logits(models[m], outs[m], kind, MODALITY[kind])[..., :V0]
            return (got - want).abs().mean().item()

        routed, per_token, naive = dist("mmer", whole=True), dist("mmer"), dist("naive_mc")
        report.append(f"{kind:12s} mean |logit - source|: mmer route {routed:.5f}  mmer per-token {per_token:.5f}  "
                      f"naive_mc {naive:.5f}")
        assert routed < naive, report[-1]
    with capsys.disabled():
        print("\n" + "\n".join(report))


@pytest.mark.parametrize("max_spans", [64, 1])  # rows as runs of positions, and gathered by index
def test_routed_linear_puts_each_token_on_its_route(monkeypatch, max_spans):
    """By construction: route 1's mask keeps only column 0 of tau, route 2 keeps all of it."""
    from mergekit_multimodal.runtime import routing

    monkeypatch.setattr(routing, "MAX_SPANS", max_spans)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    tau = torch.randn(3, 4, generator=g)
    m1 = torch.zeros(3, 4, dtype=torch.bool)
    m1[:, 0] = True
    m2 = torch.ones(3, 4, dtype=torch.bool)
    alpha = 0.5
    delta = RouteDelta(tau, [pack_mask(m1), pack_mask(m2)], [1.0, 2.0], alpha)
    state = RouteState()
    routed = RoutedLinear(lin, delta, None, state)
    x = torch.randn(1, 5, 4, generator=g)
    state.set_tokens(torch.tensor([[0, 1, 2, 0, 1]]))
    assert state.spans == ({0: [(0, 1), (3, 4)], 1: [(1, 2), (4, 5)], 2: [(2, 3)]} if max_spans > 1 else {2: [(2, 3)]})
    y = routed(x).detach().numpy()
    W = lin.weight.detach().numpy()
    base = W - alpha * tau.numpy()
    weights = {0: W, 1: base + 1.0 * m1.numpy() * tau.numpy(), 2: base + 2.0 * m2.numpy() * tau.numpy()}
    for t, r in enumerate([0, 1, 2, 0, 1]):
        np.testing.assert_allclose(y[0, t], weights[r] @ x[0, t].numpy(), rtol=1e-5, atol=1e-6)
    state.set_tokens(torch.tensor([[0, 1, 2, 0, 1]]))  # a decode step (1 token) takes the text route
    np.testing.assert_allclose(routed(x[:, :1]).detach().numpy()[0, 0], W @ x[0, 0].numpy(), rtol=1e-5)
    state.whole = 2  # the whole input on one route
    np.testing.assert_allclose(routed(x).detach().numpy()[0, 3], weights[2] @ x[0, 3].numpy(), rtol=1e-5)


@pytest.mark.parametrize("in_features", [16, 12])
def test_blocked_route_weights_equal_the_numpy_formula(monkeypatch, in_features):
    """On CPU a route's weight is built a few rows at a time (routing.BLOCK_ELEMENTS); blocks of
    8 rows here, so 20 output rows take three blocks, the last one short."""
    from mergekit_multimodal.runtime import routing

    monkeypatch.setattr(routing, "BLOCK_ELEMENTS", 8 * in_features)
    calls = []
    blocked = RouteDelta.linear_blocked
    monkeypatch.setattr(RouteDelta, "linear_blocked", lambda self, xs, *a: calls.append(sorted(xs)) or blocked(self, xs, *a))
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(in_features, 20)
    tau, tau_b = torch.randn(20, in_features, generator=g), torch.randn(20, generator=g)
    masks = [torch.rand(20, in_features, generator=g) > 0.5 for _ in range(2)]
    masks_b = [torch.rand(20, generator=g) > 0.5 for _ in range(2)]
    scales, alpha = [1.5, 0.7], 0.4
    state = RouteState()
    routed = RoutedLinear(lin, RouteDelta(tau, [pack_mask(m) for m in masks], scales, alpha),
                          RouteDelta(tau_b, [pack_mask(m) for m in masks_b], scales, alpha), state)
    x = torch.randn(1, 6, in_features, generator=g)
    route_ids = [0, 1, 1, 2, 0, 2]
    state.set_tokens(torch.tensor([route_ids]))
    y = routed(x).detach().numpy()
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    for t, r in enumerate(route_ids):
        w, bias = W, b
        if r:
            w = W + (scales[r - 1] * masks[r - 1].numpy() - alpha) * tau.numpy()
            bias = b + (scales[r - 1] * masks_b[r - 1].numpy() - alpha) * tau_b.numpy()
        np.testing.assert_allclose(y[0, t], w @ x[0, t].numpy() + bias, rtol=1e-5, atol=1e-5)
    assert calls == [[1, 2]]  # both routes in one pass over the blocks
    state.cache.keep = frozenset({2})  # route 2 resident (route cache): built whole, route 1 still blockwise
    np.testing.assert_allclose(routed(x).detach().numpy(), y, rtol=1e-5, atol=1e-5)
    assert calls[-1] == [1]
    state.cache.keep, state.whole = frozenset(), 1  # one route for the whole input: the single-route blocked path
    y = routed(x).detach().numpy()
    w = W + (scales[0] * masks[0].numpy() - alpha) * tau.numpy()
    bias = b + (scales[0] * masks_b[0].numpy() - alpha) * tau_b.numpy()
    np.testing.assert_allclose(y[0], x[0].numpy() @ w.T + bias, rtol=1e-5, atol=1e-5)
    assert calls[-1] == [1]


def test_whole_input_route_equals_the_source_model_for_its_modality(family, tmp_path):
    """MMER retention: with route('image') a text-only prompt runs on theta_base + m * tau_*."""
    out = compose(composite_config(family, "mmer", ["llava"]), str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out, modalities=[], device=DEVICE, torch_dtype=DTYPE)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w5 w6 w7", return_tensors="pt").input_ids
    with torch.no_grad(), model.route("image"):
        got = model(ids).logits

    def source(device, dtype):
        src = transformers.LlavaForConditionalGeneration.from_pretrained(family.sources["llava"], dtype=dtype)
        with torch.no_grad():
            return src.to(device).eval()(input_ids=ids.to(device)).logits

    assert_like_source(got, source, V0)


def test_generate_with_media(family, tmp_path):
    out = compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w1 <image> w2 <|AUDIO|> w3", return_tensors="pt").input_ids
    new = model.generate(ids, media={"image": media_for("llava"), "audio": media_for("qwen2_audio")},
                         max_new_tokens=4, do_sample=False)
    assert new.shape == (1, 4) and int(new.max()) < model.llm.config.vocab_size


def test_bad_inputs_are_clear(family, tmp_path):
    out = compose(composite_config(family, "mmer", ["llava"]), str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    two = tok("<image> w1 <image>", return_tensors="pt").input_ids
    with pytest.raises(CompositionError, match="more 'image' placeholders than the 1"):
        model(two, media={"image": media_for("llava")})
    with pytest.raises(CompositionError, match="has no modality 'audio'"):
        model(two, media={"audio": media_for("qwen2_audio")})
    with pytest.raises(CompositionError, match="needs inputs"):
        model(two, media={"image": {}})
    (tmp_path / "c" / "modalities" / "image" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CompositionError, match="image"):
        CompositeModel.from_pretrained(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_unpacking_by_shifts_equals_the_table_lookup(dtype):
    """The CUDA path (shifts and a select) gives exactly the CPU path's coefficients, and both
    equal scale * mask - alpha computed from the unpacked mask."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 20, generator=g) > 0.5
    d = RouteDelta(torch.randn(6, 20, generator=g).to(dtype), [pack_mask(mask)], [1.37], 0.41)
    table = d.coefficients(1)
    shifts = d._unpacked(1, d.mask0)[:120].reshape(6, 20)
    assert torch.equal(table, shifts)
    want = torch.where(mask, torch.tensor(1.37 - 0.41), torch.tensor(-0.41)).to(dtype)
    assert torch.equal(table, want)


@pytest.mark.parametrize("hidden", [16, 12])  # byte-aligned rows, and the fallback
def test_route_delta_rows_equal_the_full_delta_rows(hidden):
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(10, hidden, generator=g)
    masks = [pack_mask(torch.rand(10, hidden, generator=g) > 0.5) for _ in range(2)]
    d = RouteDelta(tau, masks, [1.5, 0.7], 0.3)
    ids = torch.tensor([[3, 0, 9], [9, 9, 1]])
    for route in (1, 2):
        torch.testing.assert_close(d.rows(route, ids), d.delta(route)[ids])


def test_route_cache_gives_the_same_logits(family, tmp_path):
    out = compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path / "c"))
    lean = CompositeModel.from_pretrained(out, device=DEVICE, torch_dtype=DTYPE, route_cache=0)  # CPU default
    fast = CompositeModel.from_pretrained(out, device=DEVICE, torch_dtype=DTYPE, route_cache="all")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w1 <image> w2 <|AUDIO|> w3", return_tensors="pt").input_ids
    media = {"image": media_for("llava"), "audio": media_for("qwen2_audio")}
    with torch.no_grad():
        want = lean(ids, media=media).logits
        first, again = fast(ids, media=media).logits, fast(ids, media=media).logits  # built, then reused
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(again, want)
    linears = [m for m in fast.llm.modules() if isinstance(m, RoutedLinear)]
    others = [m for m in fast.llm.modules() if isinstance(m, RoutedModule)]  # norms: their routed parameters
    # both routes kept, in every routed layer, each a copy of the merged layer's routed parameters
    assert sorted(fast.state.cache.weights) == [1, 2]
    assert all(len(fast.state.cache.weights[r]) == len(linears) + len(others) for r in (1, 2))
    one = sum(p.numel() * p.element_size() for m in linears for p in m.linear.parameters()) + sum(
        m.module.get_parameter(name).numel() * m.module.get_parameter(name).element_size()
        for m in others for name in m.names.values())
    assert fast.state.cache.resident_bytes() == 2 * one
    assert lean.state.cache.weights == {}
    with pytest.raises(CompositionError, match="route cache '8 parsecs': expected auto, all"):
        CompositeModel.from_pretrained(out, route_cache="8 parsecs")


def test_route_cache_keeps_the_most_used_routes_that_fit(family, tmp_path):
    out = compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path / "c"))
    probe = CompositeModel.from_pretrained(out)
    one_route = probe.state.cache.route_bytes
    model = CompositeModel.from_pretrained(out, route_cache=one_route + 1)  # room for one route
    image, audio = model.route_of["image"], model.route_of["audio"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w1 <image> w2 <|AUDIO|> w3", return_tensors="pt").input_ids
    media = {"image": media_for("llava"), "audio": media_for("qwen2_audio")}
    with torch.no_grad():
        both = model(ids, media=media).logits
        torch.testing.assert_close(both, probe(ids, media=media).logits)
    n_img = int((model.prepare_inputs(ids, media=media)[2] == image).sum())
    n_aud = int((model.prepare_inputs(ids, media=media)[2] == audio).sum())
    assert n_img != n_aud
    most, least = (image, audio) if n_img > n_aud else (audio, image)
    assert model.state.cache.keep == {most} and sorted(model.state.cache.weights) == [most]
    # the other route alone, often enough to overtake: it takes the place, the first is dropped
    alone = "w1 <image> w2" if least == image else "w1 <|AUDIO|> w2"
    only = {"image": media["image"]} if least == image else {"audio": media["audio"]}
    ids2 = tok(alone, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(abs(n_img - n_aud) // min(n_img, n_aud) + 2):
            model(ids2, media=only)
    assert model.state.cache.keep == {least} and sorted(model.state.cache.weights) == [least]


@pytest.mark.parametrize("spec, device, want", [
    ("8GiB", "cpu", 8 * 2**30), ("500MB", "cpu", 5e8), (1234, "cpu", 1234), ("all", "cpu", math.inf),
    ("0", "cpu", 0), (None, "cpu", 0), ("auto", "cpu", 0)])
def test_cache_budget_sizes(spec, device, want):
    assert cache_budget(spec, torch.device(device)) == want


@pytest.mark.parametrize("kind, route_cache", [("llava", 0), ("qwen2_audio", 0), ("llava", "all")])
def test_greedy_generation_stays_on_its_route(family, tmp_path, kind, route_cache):
    """Under route(m) every generated token runs on route m too (its embedding rows included): greedy
    decoding equals, step by step, the source class whose LLM weights are route m's (iter_route);
    with the route cache, the decode steps reuse the weights the prefill built."""
    from mergekit_multimodal.methods.routes import iter_route

    out = compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path / "c"))
    # float32 on DEVICE: greedy tokens are compared exactly, which a lower precision cannot promise
    model = CompositeModel.from_pretrained(out, modalities=[], route_cache=route_cache, device=DEVICE)
    path = family.sources[kind]
    src_cls = getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    src = src_cls.from_pretrained(path).to(DEVICE).eval()
    with torch.no_grad():  # the source class with route m's LLM weights (on the shared vocabulary rows)
        for name, w in iter_route(out, MODALITY[kind]):
            p = src.get_output_embeddings().weight if name == "lm_head.weight" else \
                src.get_decoder().get_parameter(name[len("model."):])
            rows = min(p.shape[0], w.shape[0])
            p[:rows].copy_(w[:rows])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w5 w6 w7", return_tensors="pt").input_ids
    greedy = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with model.route(MODALITY[kind]):
        got = model.generate(ids, suppress_tokens=list(range(V0, model.llm.config.vocab_size)), **greedy)
    want = src.generate(input_ids=ids.to(DEVICE), suppress_tokens=list(range(V0, src.config.text_config.vocab_size)), **greedy)
    assert torch.equal(got.sequences[0, -5:].cpu(), want.sequences[0, -5:].cpu())
    for step, (g, w) in enumerate(zip(got.scores, want.scores)):
        torch.testing.assert_close(g[..., :V0].cpu(), w[..., :V0].cpu(), rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert sorted(model.state.cache.weights) == ([] if route_cache == 0 else [model.route_of[MODALITY[kind]]])
