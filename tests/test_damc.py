"""DAMC: decoupled-source readers, the damc formula (numpy reference), low-rank and dense routes at runtime."""

import json

import numpy as np
import pytest
import torch
import transformers

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.methods.damc.train import save_decoupled, train_decoupled
from mergekit_multimodal.methods.damc.sources import safe_torch_load
from mergekit_multimodal.hub import validate_for_push
from mergekit_multimodal.methods.routes import iter_route
from mergekit_multimodal.runtime import CompositeModel
from tests.helpers import read_dir, read_json
from tests.test_runtime import media_for

V0 = 96
TARGETS = ("q_proj", "v_proj", "down_proj")


def _peft_source(family, out, modality, seed, steps=6):
    """A decoupled source trained for a few steps on the base (W0) with the training helper."""
    llm = transformers.AutoModelForCausalLM.from_pretrained(family.base)
    g = torch.Generator().manual_seed(seed)
    hidden = llm.config.hidden_size
    if modality == "image":  # the tiny LLaVA's own encoder + connector give the features
        mllm = transformers.LlavaForConditionalGeneration.from_pretrained(family.sources["llava"]).eval()
        cfg = mllm.config
        with torch.no_grad():
            feats = mllm.model.get_image_features(
                pixel_values=media_for("llava", seed)["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0]
    else:
        feats = torch.randn(4, hidden, generator=g)
    batches = [{"prompt_ids": torch.randint(3, V0, (4,), generator=g), "features": feats,
                "target_ids": torch.randint(3, V0, (5,), generator=g)}]
    trained = train_decoupled(llm, batches, modality=modality, rank=4, alpha=8, steps=steps, lr=5e-2,
                              target_modules=TARGETS, seed=seed)
    assert trained.losses[-1] < trained.losses[0]
    return save_decoupled(trained, str(out))


def _cfg(family, sources, lambdas=(0.3, 0.7), **params):
    models = [{"model": str(family.sources["llava"]), "modality": "image", "adapters": sources["image"]},
              {"model": str(family.sources["qwen2_audio"]), "modality": "audio", "adapters": sources["audio"]}]
    for m, lam in zip(models, lambdas):
        if lam is not None:
            m["parameters"] = {"lambda": lam}
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": models}
    if params:
        cfg["parameters"] = params
    return cfg


def _factors(adapter_dir):
    """Independent read of a PEFT adapter: {causal-LM tensor: (A, B)} and its alpha / r."""
    cfg = read_json(f"{adapter_dir}/adapter_config.json")
    t = read_dir(adapter_dir)
    out = {}
    for k, v in t.items():
        name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        out.setdefault(name, {})["A" if ".lora_A." in k else "B"] = v.double().numpy()
    return out, cfg["lora_alpha"] / cfg["r"]


def _delta(f, s, name):
    return s * f[name]["B"] @ f[name]["A"]


def test_damc_formula_matches_numpy_reference(family, sources, tmp_path):
    out = compose(_cfg(family, sources), str(tmp_path / "c"))
    merged = read_dir(out)
    base = {k: v.double().numpy() for k, v in read_dir(family.base).items()}
    (ti, si), (ta, sa) = _factors(f"{sources['image']}/text"), _factors(f"{sources['audio']}/text")
    (mi, smi) = _factors(f"{sources['image']}/image")
    routes = read_dir(f"{out}/routes")
    n = 0
    for name, w0 in base.items():
        got = merged[name].double().numpy()
        if name not in ti:
            np.testing.assert_allclose(got[:V0] if got.shape != w0.shape else got, w0, atol=1e-6)
            continue
        want = w0 + 0.3 * _delta(ti, si, name) + 0.7 * _delta(ta, sa, name)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # image route rebuilt from the low-rank factors = W0 + dM_image
        r = got - routes[f"text/{name}:B"].double().numpy() @ routes[f"text/{name}:A"].double().numpy() \
            + routes[f"image/{name}:B"].double().numpy() @ routes[f"image/{name}:A"].double().numpy()
        np.testing.assert_allclose(r, w0 + _delta(mi, smi, name), atol=1e-5)
        n += 1
    assert n == 2 * len(TARGETS)
    for name, w in iter_route(out, "image", torch.float64):  # the documented rebuild, streamed
        want = base[name] + _delta(mi, smi, name) if name in mi else None
        if want is not None:
            np.testing.assert_allclose(w.numpy(), want, atol=1e-5)
    assert "routes/damc.safetensors" in validate_for_push(out)
    cc = read_json(f"{out}/composite_config.json")
    assert cc["routes"]["kind"] == "damc" and cc["routes"]["low_rank"]
    assert cc["modalities"]["image"]["prefix_suffix"] == "modalities/image/prefix_suffix.safetensors"


def test_default_lambda_is_one_over_n(family, sources, tmp_path):
    out = compose(_cfg(family, sources, lambdas=(None, None)), str(tmp_path / "c"))
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = read_dir(family.base)[name].double().numpy()
    (ti, si), (ta, sa) = _factors(f"{sources['image']}/text"), _factors(f"{sources['audio']}/text")
    np.testing.assert_allclose(read_dir(out)[name].double().numpy(),
                               w0 + 0.5 * _delta(ti, si, name) + 0.5 * _delta(ta, sa, name), atol=1e-5)


class _Reference:
    """Independent per-token forward: the base LM with each targeted linear computing
    W0 x + where(token is modality m, dM_m x, sum_i lambda_i dT_i x), in plain torch."""

    def __init__(self, family, text_deltas, mod_deltas):
        self.llm = transformers.AutoModelForCausalLM.from_pretrained(family.base).double().eval()
        self.route_ids = None
        for name, module in self.llm.named_modules():
            key = f"{name}.weight"
            if isinstance(module, torch.nn.Linear) and key in text_deltas:
                module.forward = self._forward(module, text_deltas[key], {r: d[key] for r, d in mod_deltas.items()})

    def _forward(self, lin, dt, dms):
        def fwd(x):
            y = x @ lin.weight.T + x @ torch.as_tensor(dt).T
            if self.route_ids is not None and self.route_ids.shape == x.shape[:-1]:
                for r, dm in dms.items():
                    y = torch.where((self.route_ids == r).unsqueeze(-1), x @ lin.weight.T + x @ torch.as_tensor(dm).T, y)
            return y
        return fwd

    def logits(self, embeds, mask, route_ids):
        self.route_ids = route_ids
        with torch.no_grad():
            return self.llm(inputs_embeds=embeds.double(), attention_mask=mask).logits[..., :V0]


def _deltas(sources, lambdas=(0.3, 0.7)):
    text, mods = {}, {}
    for (m, d), lam in zip(sources.items(), lambdas):
        f, s = _factors(f"{d}/text")
        for name in f:
            text[name] = text.get(name, 0) + lam * _delta(f, s, name)
        fm, sm = _factors(f"{d}/{m}")
        mods[m] = {name: _delta(fm, sm, name) for name in fm}
    return text, mods


def _run(model, out, text, media=None):
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(text, return_tensors="pt").input_ids
    embeds, mask, route_ids = model.prepare_inputs(ids, None, media)
    with torch.no_grad():
        logits = model(ids, media=media).logits[..., :V0]
    return logits, embeds, mask, route_ids


@pytest.mark.parametrize("densify", [False, True])
def test_runtime_routes_match_independent_computation(family, sources, tmp_path, densify):
    out = compose(_cfg(family, sources, densify=densify), str(tmp_path / "c"))
    model = CompositeModel.from_pretrained(out)
    text, mods = _deltas(sources)
    ref = _Reference(family, text, {1: mods["image"], 2: mods["audio"]})
    # text only: the merged LLM (W0 + sum lambda_i dT_i)
    got, embeds, mask, rids = _run(model, out, "w1 w2 w3")
    torch.testing.assert_close(got.double(), ref.logits(embeds, mask, rids), rtol=1e-4, atol=1e-4)
    # an image prompt: prefix + features + suffix on the image route, the rest on the text route
    got, embeds, mask, rids = _run(model, out, "w1 w2 <image> w3 w4", {"image": media_for("llava")})
    assert (rids == 1).sum() == 5 + 4 + 5 and (rids == 2).sum() == 0
    prefix = read_dir(f"{out}/modalities/image")  # placed right after the two text tokens
    ps = {k: v for k, v in read_dir(f"{sources['image']}").items()}
    first = int((rids[0] == 1).nonzero()[0])
    torch.testing.assert_close(embeds[0, first:first + 5], ps["prefix_tokens.image"])
    torch.testing.assert_close(embeds[0, first + 9:first + 14], ps["suffix_tokens.image"])
    assert "multi_modal_projector.linear_1.weight" in prefix
    want = ref.logits(embeds, mask, rids)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    new = model.generate(tok("w1 w2 <image> w3", return_tensors="pt").input_ids, media={"image": media_for("llava")},
                         max_new_tokens=3, do_sample=False)
    assert new.shape[-1] == 3  # decode steps run on the text route
    with model.route("image"):  # whole-input route: W0 + dM_image everywhere
        got, embeds, mask, rids = _run(model, out, "w1 w2")
    torch.testing.assert_close(got.double(), ref.logits(embeds, mask, torch.ones_like(rids)), rtol=1e-4, atol=1e-4)


def _image_audio_logits(out):
    """The composite's logits on one prompt holding an audio clip and an image."""
    model = CompositeModel.from_pretrained(out)
    return _run(model, out, "w1 <|AUDIO|> w2 <image> w3", {"image": media_for("llava"), "audio": media_for("qwen2_audio")})[0]


def test_low_rank_and_densified_composites_agree(family, sources, tmp_path):
    outs = [compose(_cfg(family, sources, densify=d), str(tmp_path / f"c{d}")) for d in (False, True)]
    logits = [_image_audio_logits(out) for out in outs]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_peft_checkpoint_with_two_named_adapters(family, tmp_path):
    """What PEFT itself saves for a LLaVA holding adapters `text` (r=4) and `image` (r=2)."""
    peft = pytest.importorskip("peft")
    m = transformers.LlavaForConditionalGeneration.from_pretrained(family.sources["llava"])
    target = r".*language_model.*\.(q_proj|v_proj)"
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False),
                             adapter_name="text")
    pm.add_adapter("image", peft.LoraConfig(r=2, lora_alpha=8, target_modules=target, init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(family.sources["llava"]), "modality": "image", "adapters": str(tmp_path / "ad")}]}
    out = compose(cfg, str(tmp_path / "c"))
    text, s = _factors(str(tmp_path / "ad" / "text"))
    mod, sm = _factors(str(tmp_path / "ad" / "image"))
    name = "model.layers.1.self_attn.v_proj.weight"
    key = "model.language_model.layers.1.self_attn.v_proj.weight"
    w0 = read_dir(family.base)[name].double().numpy()
    np.testing.assert_allclose(read_dir(out)[name].double().numpy(), w0 + _delta(text, s, key), atol=1e-5)
    route = dict(iter_route(out, "image", torch.float64))[name].numpy()
    np.testing.assert_allclose(route, w0 + _delta(mod, sm, key), atol=1e-5)
    assert sm == 4.0 and s == 2.0


def test_dense_source_deltas_compose_like_their_lora_form(family, sources, tmp_path):
    """A source may bring dense deltas (`delta.safetensors` per adapter dir); those tensors get dense routes."""
    from safetensors.torch import save_file

    dense = tmp_path / "audio_dense"
    for adapter in ("text", "audio"):
        f, s = _factors(f"{sources['audio']}/{adapter}")
        (dense / adapter).mkdir(parents=True)
        save_file({n: torch.as_tensor(_delta(f, s, n)).float() for n in f}, str(dense / adapter / "delta.safetensors"))
    save_file(read_dir(sources["audio"]), str(dense / "prefix_suffix.safetensors"))
    outs = [compose(_cfg(family, {"image": sources["image"], "audio": a}), str(tmp_path / f"c{i}"))
            for i, a in enumerate((sources["audio"], str(dense)))]
    keys = read_dir(f"{outs[1]}/routes")
    assert "image/model.layers.0.self_attn.q_proj.weight" in keys and "text/model.layers.0.self_attn.q_proj.weight:A" not in keys
    logits = [_image_audio_logits(out) for out in outs]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


# -- ModelCompose release layout -------------------------------------------------------------------

def _modelcompose(family, d, seed=3, r=4, alpha=8, adapters=("default", "vision"), config=None, split=False):
    """A release as ModelCompose's train_multimodal.py writes it (torch pickle, no PEFT prefix):
    LoRA `lora_A.<adapter>` per module, `model.modal_projectors.vision.{0,2}` (mlp2x_gelu), prefix /
    suffix tokens [1, n, hidden] (`prefix_tokens.default` too, which is never used); config.json with
    the encoder and lora_r / lora_alpha. split=True moves the non-LoRA tensors to
    non_lora_trainables.bin with PEFT's `base_model.model.` prefix, as its LLaVA converter does."""
    g = torch.Generator().manual_seed(seed)
    base = read_dir(family.base)
    llava = read_dir(family.sources["llava"])
    sd = {}
    for i in range(2):
        for mod in ("self_attn.q_proj", "mlp.up_proj"):
            out_f, in_f = base[f"model.layers.{i}.{mod}.weight"].shape
            for adapter in adapters:
                sd[f"model.layers.{i}.{mod}.lora_A.{adapter}.weight"] = 0.2 * torch.randn(r, in_f, generator=g)
                sd[f"model.layers.{i}.{mod}.lora_B.{adapter}.weight"] = 0.2 * torch.randn(out_f, r, generator=g)
    other = {}
    for src, dst in (("linear_1", "0"), ("linear_2", "2")):
        for p in ("weight", "bias"):
            t = llava[f"multi_modal_projector.{src}.{p}"]
            other[f"model.modal_projectors.vision.{dst}.{p}"] = t + 0.1 * torch.randn(t.shape, generator=g)
    hidden = base["model.embed_tokens.weight"].shape[1]
    for name in ("vision", "default"):
        other[f"prefix_tokens.{name}"] = torch.randn(1, 5, hidden, generator=g)
        other[f"suffix_tokens.{name}"] = torch.randn(1, 5, hidden, generator=g)
    d.mkdir()
    if split:
        torch.save({f"base_model.model.{k}": v for k, v in other.items()}, d / "non_lora_trainables.bin")
    else:
        sd.update(other)
    torch.save(sd, d / "adapter_model.bin")
    cfg = {"mm_vision_encoder": "openai/clip-vit-large-patch14-336", "mm_audio_encoder": None,
           "lora_r": r, "lora_alpha": alpha, "mm_projector_type": "mlp2x_gelu", **(config or {})}
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "<absent>"}))
    return {**sd, **other}


def test_modelcompose_release_composes_and_runs(family, tmp_path):
    sd = _modelcompose(family, tmp_path / "mc")
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(family.sources["llava"]), "modality": "image", "adapters": str(tmp_path / "mc")}]}
    out = compose(cfg, str(tmp_path / "c"))
    stored = read_dir(f"{out}/modalities/image")
    torch.testing.assert_close(stored["multi_modal_projector.linear_1.weight"], sd["model.modal_projectors.vision.0.weight"])
    cc = read_json(f"{out}/composite_config.json")
    assert cc["modalities"]["image"]["adapters"] == {"source": str(tmp_path / "mc"), "form": "modelcompose", "name": "vision",
                                                     "encoders": {"mm_vision_encoder": "openai/clip-vit-large-patch14-336"}}
    text, mod = {}, {}
    for k in sd:
        if ".lora_A." in k:
            name = k.split(".lora_A.")[0] + ".weight"
            delta = 2.0 * (sd[k.replace("lora_A", "lora_B")] @ sd[k]).double()
            (text if ".default." in k else mod)[name] = delta  # lambda = 1/N = 1
    ref = _Reference(family, text, {1: mod})
    model = CompositeModel.from_pretrained(out)
    got, embeds, mask, rids = _run(model, out, "w1 <image> w2", {"image": media_for("llava")})
    first = int((rids[0] == 1).nonzero()[0])
    torch.testing.assert_close(embeds[0, first:first + 5], sd["prefix_tokens.vision"][0])
    torch.testing.assert_close(got.double(), ref.logits(embeds, mask, rids), rtol=1e-4, atol=1e-4)


def _read_mc(d, modality="image"):
    from mergekit_multimodal.methods.damc.sources import read_decoupled

    return read_decoupled(str(d), modality, lambda name: name)


def _dense(lr, name, sd, adapter, scale):
    want = scale * (sd[f"{name}.lora_B.{adapter}.weight"] @ sd[f"{name}.lora_A.{adapter}.weight"])
    torch.testing.assert_close(lr.dense(), want)


def test_modelcompose_lora_strategies(family, tmp_path):
    """modal+language: text = `default`, modality = `vision`; modal: no text adapter (text on W0);
    same: one `default` adapter for both. lora_alpha from config.json, else ModelCompose's default 256,
    over each lora_A's rank."""
    q = "model.layers.0.self_attn.q_proj"
    sd = _modelcompose(family, tmp_path / "both", config={"lora_strategy": "modal+language"})
    src = _read_mc(tmp_path / "both")
    assert src.adapter == "vision" and set(src.text) == set(src.modality) and len(src.text) == 4
    _dense(src.text[f"{q}.weight"], q, sd, "default", 2.0)
    _dense(src.modality[f"{q}.weight"], q, sd, "vision", 2.0)
    assert src.prefix.shape == (5, sd["prefix_tokens.vision"].shape[-1])
    torch.testing.assert_close(src.prefix, sd["prefix_tokens.vision"][0])

    sd = _modelcompose(family, tmp_path / "modal", adapters=("vision",), config={"lora_strategy": "modal"})
    src = _read_mc(tmp_path / "modal")
    assert src.text == {} and len(src.modality) == 4
    _dense(src.modality[f"{q}.weight"], q, sd, "vision", 2.0)
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(family.sources["llava"]), "modality": "image", "adapters": str(tmp_path / "modal")}]}
    out = compose(cfg, str(tmp_path / "c-modal"))
    routes = read_dir(f"{out}/routes")
    assert not any(k.startswith("text/") for k in routes) and any(k.startswith("image/") for k in routes)

    sd = _modelcompose(family, tmp_path / "same", adapters=("default",),
                       config={"lora_strategy": "same", "lora_r": "<absent>", "lora_alpha": "<absent>"})
    src = _read_mc(tmp_path / "same")
    assert src.adapter == "vision"
    _dense(src.text[f"{q}.weight"], q, sd, "default", 256 / 4)  # default lora_alpha / rank of lora_A
    _dense(src.modality[f"{q}.weight"], q, sd, "default", 256 / 4)


def test_modelcompose_non_lora_trainables_and_projector_type(family, tmp_path):
    sd = _modelcompose(family, tmp_path / "split", split=True)
    src = _read_mc(tmp_path / "split")
    torch.testing.assert_close(src.projector["0.weight"], sd["model.modal_projectors.vision.0.weight"])
    torch.testing.assert_close(src.suffix, sd["suffix_tokens.vision"][0])
    _modelcompose(family, tmp_path / "linear", config={"mm_projector_type": "linear"})
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(family.sources["llava"]), "modality": "image", "adapters": str(tmp_path / "linear")}]}
    with pytest.raises(CompositionError, match="projector type 'linear'"):
        compose(cfg, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_composed_modelcompose_checkpoints_are_refused(family, tmp_path):
    _modelcompose(family, tmp_path / "merged", adapters=("default-vision", "default-audio", "vision", "audio"))
    with pytest.raises(CompositionError, match="composed ModelCompose checkpoint.*default-audio, default-vision"):
        _read_mc(tmp_path / "merged")
    _modelcompose(family, tmp_path / "two", config={"mm_audio_encoder": "BEATs"})
    with pytest.raises(CompositionError, match="composed ModelCompose checkpoint"):
        _read_mc(tmp_path / "two")
    _modelcompose(family, tmp_path / "odd", config={"lora_strategy": "mixture"})
    with pytest.raises(CompositionError, match="lora_strategy 'mixture'"):
        _read_mc(tmp_path / "odd")


def test_modelcompose_dir_as_model_is_refused_clearly(family, tmp_path):
    _modelcompose(family, tmp_path / "mc")
    cfg = {"merge_method": "damc", "base_model": str(family.base), "models": [
        {"model": str(tmp_path / "mc"), "modality": "image", "adapters": str(tmp_path / "mc")}]}
    with pytest.raises(CompositionError, match="holds no encoder"):
        compose(cfg, str(tmp_path / "c"))


class Evil:
    pass


def test_pickle_with_non_tensors_is_refused(tmp_path):
    torch.save({"a": torch.zeros(1), "b": "text"}, tmp_path / "strings.bin")
    with pytest.raises(CompositionError, match=r"strings\.bin: entry 'b' is a str, not a tensor"):
        safe_torch_load(str(tmp_path / "strings.bin"))
    torch.save({"a": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CompositionError, match=r"evil\.bin: refused to unpickle"):
        safe_torch_load(str(tmp_path / "evil.bin"))


def test_damc_needs_adapters(family, tmp_path):
    cfg = {"merge_method": "damc", "base_model": str(family.base),
           "models": [{"model": str(family.sources["llava"]), "modality": "image"}]}
    with pytest.raises(CompositionError, match="needs `adapters:`"):
        compose(cfg, str(tmp_path / "c"))


def test_training_sequence_with_text_after_the_item(family):
    """prompt, prefix, features, suffix, after, target: only the prefix..suffix span takes the modality
    adapter, and only the target is a loss label (the question after the item is context)."""
    from mergekit_multimodal.methods.damc.train import _sequence

    llm = transformers.AutoModelForCausalLM.from_pretrained(family.base)
    hidden = llm.config.hidden_size
    prefix, suffix, feats = torch.randn(2, hidden), torch.randn(1, hidden), torch.randn(3, hidden)
    batch = {"prompt_ids": torch.tensor([5, 6]), "features": feats, "after_ids": torch.tensor([7, 8, 9]),
             "target_ids": torch.tensor([10, 11])}
    embeds, mask, labels = _sequence(llm, prefix, suffix, batch)
    emb = llm.get_input_embeddings()
    want = torch.cat([emb(torch.tensor([5, 6])), prefix, feats, suffix, emb(torch.tensor([7, 8, 9])),
                      emb(torch.tensor([10, 11]))])
    assert torch.equal(embeds[0], want)
    assert mask[0].tolist() == [False] * 2 + [True] * 6 + [False] * 5
    assert labels[0].tolist() == [-100] * 11 + [10, 11]


def test_a_batch_of_sequences_gives_the_token_weighted_mean_loss(family):
    """batch_size=2, no update (lr=0): the step's loss is the mean over both sequences' target
    tokens of the one-sequence losses, so padding neither counts nor changes what is attended."""
    g = torch.Generator().manual_seed(3)
    hidden = transformers.AutoConfig.from_pretrained(family.base).hidden_size
    batches = [{"prompt_ids": torch.randint(3, V0, (n_prompt,), generator=g), "features": torch.randn(n_feat, hidden, generator=g),
                "target_ids": torch.randint(3, V0, (n_target,), generator=g)}
               for n_prompt, n_feat, n_target in ((2, 3, 4), (5, 4, 2))]

    def loss(chosen, batch_size):
        llm = transformers.AutoModelForCausalLM.from_pretrained(family.base)
        return train_decoupled(llm, chosen, modality="image", rank=4, steps=1, lr=0.0, target_modules=TARGETS,
                               seed=7, batch_size=batch_size).losses[0]

    ticks = []
    train_decoupled(transformers.AutoModelForCausalLM.from_pretrained(family.base), batches, modality="image",
                    rank=4, steps=3, target_modules=TARGETS, progress=ticks.append)
    assert ticks == [1, 1, 1]  # one call per optimizer step
    singles = [loss([b], 1) for b in batches]
    counts = [len(b["target_ids"]) for b in batches]
    want = sum(lo * n for lo, n in zip(singles, counts)) / sum(counts)
    assert loss(batches, 2) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        loss(batches, 0)


def test_connector_trained_with_the_adapters_replaces_the_paired_connector(family, tmp_path):
    """train_decoupled(connector=...) updates the LLaVA connector; save_decoupled writes it in the
    paired model's names; the damc composite carries it instead of the paired model's, and the
    loader runs with it. The vision tower stays the paired model's."""
    import copy

    from safetensors.torch import load_file, save_file

    llm = transformers.AutoModelForCausalLM.from_pretrained(family.base)
    mllm = transformers.LlavaForConditionalGeneration.from_pretrained(family.sources["llava"])
    conn = copy.deepcopy(mllm.model.multi_modal_projector)
    before = {k: v.clone() for k, v in conn.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    batches = [{"prompt_ids": torch.randint(3, V0, (3,), generator=g),
                "encoder_features": torch.randn(4, mllm.config.vision_config.hidden_size, generator=g),
                "target_ids": torch.randint(3, V0, (4,), generator=g)}]
    trained = train_decoupled(llm, batches, modality="image", rank=4, alpha=8, steps=6, lr=5e-2,
                              target_modules=TARGETS, connector=conn)
    assert trained.losses[-1] < trained.losses[0]
    assert all(not torch.equal(before[k], v) for k, v in conn.state_dict().items())
    adapters = save_decoupled(trained, str(tmp_path / "ad"))
    saved = load_file(f"{adapters}/connector.safetensors")
    assert set(saved) == {f"multi_modal_projector.{k}" for k in before}

    cfg = {"merge_method": "damc", "base_model": str(family.base),
           "models": [{"model": str(family.sources["llava"]), "modality": "image", "adapters": adapters}]}
    out = compose(cfg, str(tmp_path / "c"))
    stored = read_dir(tmp_path / "c" / "modalities" / "image")
    paired = read_dir(family.sources["llava"])
    for k, t in saved.items():
        torch.testing.assert_close(stored[k], t, rtol=0, atol=0)
    vision = [k for k in stored if k.startswith("vision_tower.")]
    assert vision and all(torch.equal(stored[k], paired[k]) for k in vision)
    loaded = CompositeModel.from_pretrained(out).encoders["image"].model.model.multi_modal_projector.state_dict()
    for k, t in conn.state_dict().items():
        torch.testing.assert_close(loaded[k], t, rtol=0, atol=0)

    with pytest.raises(ValueError, match="encoder_features"):
        train_decoupled(transformers.AutoModelForCausalLM.from_pretrained(family.base),
                        [{"prompt_ids": batches[0]["prompt_ids"], "features": torch.randn(2, 16),
                          "target_ids": batches[0]["target_ids"]}], modality="image", connector=conn)
    bad = dict(saved)
    bad["multi_modal_projector.linear_9.weight"] = bad.pop("multi_modal_projector.linear_2.weight")
    save_file(bad, f"{adapters}/connector.safetensors")
    with pytest.raises(CompositionError, match=r"'multi_modal_projector.linear_9.weight' is not a connector tensor"):
        compose(cfg, str(tmp_path / "c2"))
    bad = dict(saved)
    bad["multi_modal_projector.linear_2.weight"] = bad["multi_modal_projector.linear_2.weight"][:, :3].contiguous()
    save_file(bad, f"{adapters}/connector.safetensors")
    with pytest.raises(CompositionError, match="has shape"):
        compose(cfg, str(tmp_path / "c3"))
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_collated_batch_keeps_each_tokens_adapter(family):
    """With non-zero, different text and modality adapters, the right-padded batch's loss is the
    target-token-weighted mean of the one-sequence losses: every real token kept its type."""
    from mergekit_multimodal.methods.damc.train import _Mask, _collate, _sequence, _wrap

    g = torch.Generator().manual_seed(4)
    llm = transformers.AutoModelForCausalLM.from_pretrained(family.base)
    hidden = llm.config.hidden_size
    mask = _Mask()
    for wrap in _wrap(llm, TARGETS, 4, 2.0, mask).values():
        for b in wrap.B:
            b.data = 0.3 * torch.randn(b.shape, generator=g)
    prefix, suffix = torch.randn(2, hidden, generator=g), torch.randn(3, hidden, generator=g)
    batches = [{"prompt_ids": torch.randint(3, V0, (n_p,), generator=g), "features": torch.randn(n_f, hidden, generator=g),
                "target_ids": torch.randint(3, V0, (n_t,), generator=g)} for n_p, n_f, n_t in ((2, 3, 4), (6, 5, 2))]
    seqs = [_sequence(llm, prefix, suffix, b) for b in batches]
    singles = []
    with torch.no_grad():
        for e, m, lab in seqs:
            mask.value = m
            singles.append(llm(inputs_embeds=e, labels=lab).loss.item())
        embeds, mask.value, labels, attention = _collate(seqs)
        batched = llm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss.item()
        mask.value = torch.zeros_like(mask.value)  # all tokens on the text adapter: a different loss
        all_text = llm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss.item()
    counts = [len(b["target_ids"]) for b in batches]
    assert batched == pytest.approx(sum(lo * n for lo, n in zip(singles, counts)) / sum(counts), rel=1e-5)
    assert abs(all_text - batched) > 1e-3


def test_connector_names_match_across_layouts():
    """A legacy-named connector.safetensors pairs with a transformers-5 checkpoint and back."""
    from mergekit_multimodal.methods.damc.sources import DecoupledSource, connector_overrides

    t = torch.zeros(3, 2)
    for given, names in ((["multi_modal_projector.linear_1.weight"], ["model.multi_modal_projector.linear_1.weight"]),
                         (["model.multi_modal_projector.linear_1.weight"], ["multi_modal_projector.linear_1.weight"])):
        src = DecoupledSource("d", "peft", "image", connector={given[0]: t})
        assert list(connector_overrides(src, names, {names[0]: ((3, 2), torch.float32)}, "w")) == names


def test_connector_kwargs_reach_the_connector(mistral_family):
    """Mistral3's projector merges patches by image size: `connector_kwargs` pass image_sizes on."""
    import copy

    llm = transformers.AutoModelForCausalLM.from_pretrained(mistral_family.base)
    mllm = transformers.Mistral3ForConditionalGeneration.from_pretrained(mistral_family.sources["mistral3"])
    conn = copy.deepcopy(mllm.model.multi_modal_projector)
    side = mllm.config.vision_config.patch_size
    g = torch.Generator().manual_seed(6)
    batch = {"prompt_ids": torch.randint(3, V0, (3,), generator=g),
             "encoder_features": torch.randn(16, mllm.config.vision_config.hidden_size, generator=g),  # 4 x 4 patches
             "connector_kwargs": {"image_sizes": torch.tensor([[4 * side, 4 * side]])},
             "target_ids": torch.randint(3, V0, (4,), generator=g)}
    before = conn.linear_1.weight.clone()
    trained = train_decoupled(llm, [batch], modality="image", rank=4, steps=4, lr=5e-2, target_modules=TARGETS,
                              connector=conn)
    assert trained.losses[-1] < trained.losses[0] and not torch.equal(before, conn.linear_1.weight)
    with torch.no_grad():  # 16 patches merged 2 x 2: 4 features
        assert conn(batch["encoder_features"], **batch["connector_kwargs"]).reshape(-1, llm.config.hidden_size).shape[0] == 4
