"""`mergekit-mm-export`: one route of a composite as files any engine loads (docs/serving.md).

Two forms, both streamed tensor by tensor into a directory written aside and renamed into place
(compose/output.py: lock, no half-written output, `--overwrite` refused by default):

- **checkpoint**: modality m's own source class (config.json `architectures`), its LLM being route m
  (`methods.routes.iter_route`: MMER merged + (s_m mask_m - alpha) tau_*, DAMC W0 + dM_m, other
  methods the merged LLM), its encoder and connector as stored under `modalities/<m>/`, under the
  names the class holds them (the class built on the meta device says which; the family's
  `SplitLayout` maps its LLM names to the composite's), with the source's config (vocabulary and
  placeholder ids set to the composite's), the composite's tokenizer, m's processor files and a
  model card. Loads with plain transformers.
- **LoRA** (`lora=True`): route m as a PEFT LoRA adapter over the merged LLM (the composite's
  root, a plain causal LM: the text route). Exact for DAMC's low-rank routes (B' = [B_m, -B_text],
  A' = [A_m; A_text]); anything else needs an explicit `rank` (a truncated SVD of route m minus the
  merged weight per tensor) and records each tensor's relative error and the logit error on a
  probe input in `export_report.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import click
import torch
import transformers

from mergekit_multimodal.compose import output
from mergekit_multimodal.compose.card import hub_ids
from mergekit_multimodal.compose.checkpoint import _st_dtype
from mergekit_multimodal.compose.vocab import TOKENIZER_FILES
from mergekit_multimodal.compose.writer import Entry, PlannedShardWriter
from mergekit_multimodal.errors import CompositionError, cli_errors
from mergekit_multimodal.families import LLM, SplitLayout, causal_lm_class, get_family
from mergekit_multimodal.format import files as F
from mergekit_multimodal.format.manifest import Manifest, ModalityEntry
from mergekit_multimodal.format.tensors import header_shapes, open_stream
from mergekit_multimodal.methods.routes import iter_route

#: transformers' default shard size for save_pretrained
SHARD_SIZE = 5 * 1000**3
REPORT = "export_report.json"
#: token ids of the probe input the low-rank report measures the logit error on
PROBE_LENGTH, PROBE_SEED = 16, 0


def export(composite: str, out: str, route: str, *, lora: bool = False, rank: Optional[int] = None,
           overwrite: bool = False, shard_size: int = SHARD_SIZE) -> str:
    """Write route `route` of `composite` to `out` (a checkpoint, or with `lora` a PEFT adapter) and
    return its path; on any failure nothing is left at `out`.

    >>> export("my-composite", "my-composite-image", "image")  # doctest: +SKIP
    """
    composite = os.path.abspath(composite)
    manifest = Manifest.read(composite)
    entry = manifest.modality(route, composite)
    if rank is not None and not lora:
        raise CompositionError("--rank is for --lora (a low-rank adapter); a checkpoint export is exact")
    if rank is not None and rank < 1:
        raise CompositionError(f"--rank {rank}: must be at least 1")
    if lora:
        plan = _lora_plan(composite, manifest, route, rank)
        write = lambda tmp: _write_lora(composite, manifest, route, plan, rank, tmp)  # noqa: E731
    else:
        plan = _checkpoint_plan(composite, manifest, route, entry)
        write = lambda tmp: _write_checkpoint(composite, manifest, route, entry, plan, tmp, shard_size)  # noqa: E731
    return output.write_aside(out, write, inputs=[composite], overwrite=overwrite)


# -- checkpoint ------------------------------------------------------------------------------------

class _CheckpointPlan:
    def __init__(self, cls_name: str, config: dict, entries: List[Entry], llm_names: Dict[str, str],
                 modality_names: Dict[str, str], dropped_ids: Dict[str, int]):
        self.cls_name, self.config, self.entries = cls_name, config, entries
        self.llm_names = llm_names  # causal-LM name (the route's) -> name in the checkpoint
        self.modality_names = modality_names  # name under modalities/<m>/ -> name in the checkpoint
        self.dropped_ids = dropped_ids  # config token-id fields the composite's vocabulary cannot name
        self.named_tokens: Dict[str, str] = {}  # tokenizer attributes the source's processor reads


def _checkpoint_plan(path: str, manifest: Manifest, m: str, entry: ModalityEntry) -> _CheckpointPlan:
    """Every tensor the source class holds, where it comes from, checked before anything is written."""
    where = f"{path}: modality {m!r}"
    if entry.prefix_suffix:
        raise CompositionError(
            f"{where}: its items are wrapped in learned prefix/suffix embeddings ({entry.prefix_suffix}), which "
            f"{entry.architecture} has no place for; export its LLM route with --lora instead")
    family = get_family(entry.family, where, modality=m)
    cls = getattr(transformers, entry.architecture or "", None)
    if cls is None or (family.encoder is not None and family.encoder.load is not None):
        raise CompositionError(
            f"{where}: its source class {entry.architecture!r} (family {family.name}) is not a transformers class, so "
            "no checkpoint plain transformers loads can hold this route; export its LLM route with --lora instead")
    mdir = os.path.join(path, entry.path)
    with open(os.path.join(mdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config, dropped = _exported_config(config, manifest, m, entry, family, _token_ids(path, family, where))
    try:
        cfg = cls.config_class.from_dict(config)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as exc:
        raise CompositionError(f"{where}: {entry.architecture} cannot be built from {mdir}/config.json with the "
                               f"composite's vocabulary ({type(exc).__name__}: {exc})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    llm = header_shapes(path, "model")
    stored = header_shapes(mdir, "model")
    layout = SplitLayout(family)
    entries, llm_names, modality_names = [], {}, {}
    for key, shape in expected.items():
        part, name = layout.classify(key)
        if part == LLM:
            if name == "lm_head.weight" and manifest.llm.tie_word_embeddings:
                continue  # tied: transformers takes the head from the embedding
            have, llm_names[name] = llm.get(name), key
            src = f"{path}/model*.safetensors"
        else:
            name = key if key in stored else key[len("model."):] if key.startswith("model.") else key
            have, modality_names[name] = stored.get(name), key
            src = f"{mdir}/model*.safetensors"
        if have is None:
            raise CompositionError(f"{where}: {entry.architecture} holds tensor {key!r}, which the composite lacks "
                                   f"(looked for {name!r} in {src})")
        if tuple(have[0]) != shape:
            raise CompositionError(f"{where}: tensor {name!r} in {src} is {list(have[0])}; {entry.architecture} "
                                   f"holds {key!r} as {list(shape)}")
        entries.append(Entry(key, shape, _st_dtype(have[1])))
    extra = sorted(set(stored) - set(modality_names)) + sorted(set(llm) - set(llm_names) - {"lm_head.weight"})
    if extra:
        raise CompositionError(f"{where}: {entry.architecture} has no place for tensor {extra[0]!r} "
                               f"({len(extra)} such); refusing to drop part of the route")
    plan = _CheckpointPlan(entry.architecture, config, entries, llm_names, modality_names, dropped)
    plan.named_tokens = _named_tokens(path, entry, family, where)
    return plan


def _named_tokens(path: str, entry: ModalityEntry, family, where: str) -> Dict[str, str]:
    """The tokenizer attributes the source's processor reads (Family.named_tokens), each a token of
    the composite's vocabulary (checked before anything is written)."""
    if not family.named_tokens:
        return {}
    named = {k: v.format(entry.placeholder or "") for k, v in family.named_tokens.items()}
    vocab = transformers.AutoTokenizer.from_pretrained(path).get_vocab()
    missing = sorted(f"{k}={v!r}" for k, v in named.items() if v not in vocab)
    if missing:
        raise CompositionError(f"{where}: the source's processor reads tokenizer tokens {', '.join(missing)}, which "
                               f"the composite's tokenizer ({path}) does not hold")
    return named


def _token_ids(path: str, family, where: str) -> Dict[str, int]:
    """The composite's ids of the tokens the family's config fields name (Family.token_fields)."""
    if not family.token_fields:
        return {}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    missing = sorted(t for t in family.token_fields.values() if t not in vocab)
    if missing:
        raise CompositionError(f"{where}: the source's config names tokens {', '.join(missing)}, which the "
                               f"composite's tokenizer ({path}) does not hold")
    return {k: vocab[t] for k, t in family.token_fields.items()}


def _exported_config(config: dict, manifest: Manifest, m: str, entry: ModalityEntry, family,
                     token_ids: Optional[Dict[str, int]] = None) -> Tuple[dict, Dict[str, int]]:
    """The source's config with the composite's vocabulary: its size, tied head, m's placeholder id.
    Other token-id fields that point past the base vocabulary name rows of the source's own tokenizer,
    which the composite does not keep: they are dropped (listed in the card), never left pointing at
    another token of the composite's vocabulary."""
    config = json.loads(json.dumps(config))
    text = config.setdefault("text_config", {})
    text["vocab_size"] = manifest.llm.vocab_size
    config["tie_word_embeddings"] = text["tie_word_embeddings"] = manifest.llm.tie_word_embeddings
    key = SplitLayout(family).placeholder_key(config, m)
    if key is not None and entry.placeholder_id is not None:
        config[key] = entry.placeholder_id
    for k, v in (token_ids or {}).items():  # fields naming a token the composite holds: its id there
        if k in config:
            config[k] = v
    dropped = {}
    for section, prefix in ((config, ""), (text, "text_config.")):
        for k, v in list(section.items()):
            if section is config and k in (token_ids or {}):
                continue
            is_id = k.endswith(("_token_id", "_token_index")) or k in ("pad_token_id", "bos_token_id", "eos_token_id")
            if (section is not config or k != key) and is_id and isinstance(v, int) and v >= manifest.llm.base_vocab_size:
                # a placeholder of the class's other input (Video-LLaVA's images) must stay an int: an id
                # no token has, so that input is off; anything else is dropped
                section[k] = manifest.llm.vocab_size if k in family.placeholder_keys else None
                dropped[prefix + k] = v
    config.pop("transformers_version", None)
    return config, dropped


def _write_checkpoint(path: str, manifest: Manifest, m: str, entry: ModalityEntry, plan: _CheckpointPlan,
                      out: str, shard_size: int) -> None:
    os.makedirs(out)
    dtypes = {e.name: e.dtype for e in plan.entries}
    writer = PlannedShardWriter(out, plan.entries, shard_size)
    try:
        for name, w in iter_route(path, m):
            output.check_signals()
            if name in plan.llm_names:
                key = plan.llm_names[name]
                writer.write(key, w.to(dtypes[key]))
        mdir = os.path.join(path, entry.path)
        stream = open_stream(mdir, "model")
        for name, key in plan.modality_names.items():
            output.check_signals()
            writer.write(key, stream.get_tensor(name).to(dtypes[key]))
        stream.flush()
    except BaseException:
        writer.close(check=False)
        raise
    writer.close()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(plan.config, f, indent=2)
    _copy(path, out, TOKENIZER_FILES + F.BASE_FILES)
    _name_tokens(out, plan.named_tokens)
    _copy(os.path.join(path, entry.path), out, F.PROCESSOR_FILES)
    _set_processor_token(out, entry, get_family(entry.family, modality=m).kind)
    _write_card(out, manifest, m, entry, f"`{plan.cls_name}` checkpoint", plan.dropped_ids)


def _copy(src_dir: str, out: str, names) -> None:
    for name in names:
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(out, name))


def _name_tokens(out: str, named: Dict[str, str]) -> None:
    """tokenizer_config.json's `extra_special_tokens` (how transformers sets attributes such as
    `boi_token` / `boi_token_id`) gets the tokens the source's processor reads."""
    file = os.path.join(out, "tokenizer_config.json")
    if not named or not os.path.exists(file):
        return
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    extra = data.get("extra_special_tokens") if isinstance(data.get("extra_special_tokens"), dict) else {}
    data["extra_special_tokens"] = {**extra, **named}
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _set_processor_token(out: str, entry: ModalityEntry, kind: Optional[str]) -> None:
    """A processor config naming its placeholder (`image_token`, ...) names the composite's one."""
    file = os.path.join(out, "processor_config.json")
    if not (kind and entry.placeholder and os.path.exists(file)):
        return
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and f"{kind}_token" in data:
        data[f"{kind}_token"] = entry.placeholder
        with open(file, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)


def _write_card(out: str, manifest: Manifest, m: str, entry: ModalityEntry, what: str,
                dropped: Optional[Dict[str, int]] = None, extra: str = "") -> None:
    from huggingface_hub import ModelCardData

    sources = [manifest.base_model] + [e.source for e in manifest.modalities.values()]
    ids = hub_ids(sources)
    data = ModelCardData(base_model=ids or None, base_model_relation="merge" if ids else None,
                         library_name="peft" if "LoRA" in what else "transformers",
                         tags=["merge", "mergekit-multimodal", manifest.merge_method, f"route-{m}"])
    listed = "\n".join(f"- `{s}`" for s in sources)
    dropped_text = "".join(
        f"\nConfig field `{k}` (source id {v}) names a row of the source's own tokenizer, which the composite does "
        f"not keep: it is unset (a placeholder of another input is set to {manifest.llm.vocab_size}, an id no token "
        "has, so that input is off).\n" for k, v in (dropped or {}).items())
    text = f"""---
{data.to_yaml()}
---
# Route `{m}` of a mergekit-multimodal composite

A {what} of modality `{m}`'s route: its source `{entry.source}` ({entry.architecture}) with the LLM
weights the composite's **{manifest.merge_method}** method gives that route (docs/serving.md of
mergekit-multimodal). The whole request runs on this route. Composite sources (base first):

{listed}

Token ids are the composite's (its tokenizer is included); `{entry.placeholder}` (id {entry.placeholder_id}) is
this modality's placeholder.
{dropped_text}{extra}"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


# -- LoRA adapter ----------------------------------------------------------------------------------

def _lora_plan(path: str, manifest: Manifest, m: str, rank: Optional[int]) -> Dict[str, str]:
    """Routed tensor -> module kind ("linear" / "embedding" / other), checked for an exact adapter."""
    from mergekit_multimodal.methods import get_method

    if manifest.routes is None:
        raise CompositionError(f"{path}: a {manifest.merge_method} composite has one route, the merged LLM; "
                               "there is no adapter to export (export the checkpoint instead)")
    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = causal_lm_class(cfg) or transformers.AutoModelForCausalLM  # Auto's error names an unknown one
    with torch.device("meta"):
        llm = cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls(cfg)
    modules = dict(llm.named_modules())
    kinds = {}
    method = get_method(manifest.merge_method)
    for name in sorted(header_shapes(path, "model")):  # sorted: the headers' order is a set's
        module = modules.get(name.rsplit(".", 1)[0])
        kinds[name] = ("linear" if isinstance(module, torch.nn.Linear) and name.endswith(".weight") else
                       "embedding" if isinstance(module, torch.nn.Embedding) else "other")
    if rank is None:
        from mergekit_multimodal.methods.damc.runtime import LowRankDelta  # the only exact low-rank route

        for name in kinds:
            d = method.read_deltas(path, manifest, list(manifest.modalities), torch.float32, only=(name,)).get(name)
            if d is None:
                continue
            if kinds[name] != "other" and not (isinstance(d, LowRankDelta) and kinds[name] == "linear"):
                raise CompositionError(
                    f"{path}: route {m!r} of this {manifest.merge_method} composite is not low-rank (tensor {name!r}); "
                    "a LoRA adapter can only approximate it: pass --rank R to choose the rank (the error per tensor and "
                    "on a probe input is reported)")
    return kinds


def _factors(delta, route: int, kind: str, rank: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], relative Frobenius error) of route `route`'s delta."""
    from mergekit_multimodal.methods.damc.runtime import LowRankDelta

    if rank is None and isinstance(delta, LowRankDelta):
        a = [getattr(delta, f"A{route}")] if route in delta.routes else []
        b = [getattr(delta, f"B{route}")] if route in delta.routes else []
        if delta.has_text:
            a.append(delta.text_A)
            b.append(-delta.text_B)
        return torch.cat(a, 0), torch.cat(b, 1), 0.0
    d = delta.delta(route).float()
    if kind == "embedding":  # PEFT's embedding LoRA: delta = (B A)^T, A [r, vocab], B [hidden, r]
        d = d.T
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    norm = d.norm()
    err = float((d - b @ a).norm() / norm) if norm > 0 else 0.0
    return a, b, err


def _write_lora(path: str, manifest: Manifest, m: str, kinds: Dict[str, str], rank: Optional[int], out: str) -> None:
    from peft import LoraConfig

    from mergekit_multimodal.methods import get_method

    os.makedirs(out)
    method = get_method(manifest.merge_method)
    route = manifest.route_ids()[m]
    shapes = header_shapes(path, "model")
    factors, errors, whole = {}, {}, {}
    merged = open_stream(path, "model")
    for name, kind in kinds.items():  # one tensor's delta at a time; the factors are low-rank
        output.check_signals()
        delta = method.read_deltas(path, manifest, list(manifest.modalities), torch.float32, only=(name,)).get(name)
        if delta is None:
            continue
        dtype = _st_dtype(shapes[name][1])
        if kind == "other":  # a norm: LoRA has no form for it; PEFT keeps the route's whole weight (modules_to_save)
            whole[name] = delta.apply(merged.get_tensor(name).float(), route).to(dtype)
            continue
        a, b, err = _factors(delta, route, kind, rank)
        factors[name] = (kind, a.to(dtype), b.to(dtype))
        errors[name] = err
    merged.flush()
    r = max((a.shape[0] for _, a, _ in factors.values()), default=1)
    tensors, targets = {}, []
    for name, (kind, a, b) in factors.items():
        module = name.rsplit(".", 1)[0]
        targets.append(module)
        pad = r - a.shape[0]  # zero rows/columns keep B A unchanged: one rank for every module
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        if kind == "embedding":
            tensors[f"base_model.model.{module}.lora_embedding_A"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    for name, w in whole.items():
        tensors[f"base_model.model.{name}"] = w.contiguous()
    if not tensors:
        raise CompositionError(f"{path}: route {m!r} equals the merged LLM on every tensor a LoRA adapter can hold; "
                               "there is nothing to export")
    from safetensors.torch import save_file  # the adapter is low-rank: one file, as PEFT writes it

    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=r, target_modules=sorted(targets), lora_dropout=0.0, bias="none",
               modules_to_save=sorted(n.rsplit(".", 1)[0] for n in whole) or None,
               task_type="CAUSAL_LM", base_model_name_or_path=path).save_pretrained(out)
    _copy(path, out, TOKENIZER_FILES)
    exact = rank is None
    report = {"composite": path, "route": m, "merge_method": manifest.merge_method, "rank": r, "exact": exact,
              "relative_error": errors, "whole_weights": sorted(whole)}
    if not exact:
        report["probe"] = _probe_error(path, m, out)
    with open(os.path.join(out, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    worst = max(errors.values(), default=0.0)
    note = ("Exact: route m's LLM weights are the merged LLM plus this adapter." if exact else
            f"Approximate (rank {r}): largest relative error per tensor {worst:.4g}, relative logit error on a probe "
            f"input {report['probe']['relative_error']:.4g}; per tensor in `{REPORT}`.")
    entry = manifest.modalities[m]
    _write_card(out, manifest, m, entry, "PEFT LoRA adapter (over the composite's merged LLM)",
                extra=f"\n{note} Base model: the composite directory's merged LLM (`AutoModelForCausalLM`). "
                      "The adapter holds the LLM route only; the encoder and connector are the composite's "
                      f"`modalities/{m}/`.\n")


def _probe_error(path: str, m: str, adapter: str) -> Dict[str, float]:
    """The adapter over the merged LLM against route m itself, on fixed token ids of the base vocabulary."""
    from peft import PeftModel

    from mergekit_multimodal.runtime import CompositeModel

    model = CompositeModel.from_pretrained(path, modalities=[])
    ids = torch.randint(0, model.manifest.llm.base_vocab_size, (1, PROBE_LENGTH),
                        generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad(), model.route(m):
        want = model(ids).logits.float()
    del model
    base = (causal_lm_class(transformers.AutoConfig.from_pretrained(path)) or transformers.AutoModelForCausalLM
            ).from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits.float()
    return {"relative_error": float((got - want).norm() / want.norm()),
            "max_abs_error": float((got - want).abs().max()), "tokens": PROBE_LENGTH}


# -- command line ----------------------------------------------------------------------------------

@click.command("mergekit-mm-export")
@click.argument("composite", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--route", "route", required=True, help="the modality whose route is exported (e.g. image)")
@click.option("--lora", is_flag=True, help="a PEFT LoRA adapter over the merged LLM instead of a checkpoint")
@click.option("--rank", type=int, default=None,
              help="--lora of a route that is not low-rank (MMER): the SVD rank (the error is reported)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--debug", is_flag=True, help="show the traceback of an error")
def main(composite, out, route, lora, rank, overwrite, debug):
    """Export route ROUTE of COMPOSITE to OUT: its source's own transformers checkpoint, or (--lora)
    a PEFT adapter over the merged LLM. docs/serving.md shows how to serve the result."""
    with cli_errors(1, debug):
        path = export(composite, out, route, lora=lora, rank=rank, overwrite=overwrite)
        if lora and rank is not None:
            with open(os.path.join(path, REPORT), encoding="utf-8") as f:
                report = json.load(f)
            worst = max(report["relative_error"].values(), default=0.0)
            click.echo(f"rank {report['rank']}: largest relative error per tensor {worst:.4g}, probe logit relative error "
                       f"{report['probe']['relative_error']:.4g} (per tensor: {os.path.join(path, REPORT)})")
        click.echo(path)
