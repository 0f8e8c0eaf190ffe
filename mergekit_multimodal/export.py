"""`mergekit-mm-export`: one route of a composite as files any engine loads (docs/serving.md).

Three forms, all streamed tensor by tensor into a directory written aside and renamed into place
(compose/output.py: lock, no half-written output, `--overwrite` refused by default):

- **checkpoint**: modality m's own source class (config.json `architectures`), its LLM being route m
  (`methods.routes.iter_route`: MMER merged + (s_m mask_m - alpha) tau_*, DAMC W0 + dM_m, other
  methods the merged LLM), its encoder and connector as stored under `modalities/<m>/`, under the
  names the class holds them (the class built on the meta device says which; the family's
  `SplitLayout` maps its LLM names to the composite's). The vocabulary is the source's own: its
  config.json, tokenizer and processor files as stored under `modalities/<m>/`, each embedding /
  head row gathered from the composite's row of the same token (`_Vocab`; rows another source
  brought, ids moved and padding rows are listed in the model card). Loads with plain transformers.
- **LoRA** (`lora=True`): route m as a PEFT LoRA adapter over the merged LLM (the composite's
  root, a plain causal LM: the text route). Exact for DAMC's low-rank routes (B' = [B_m, -B_text],
  A' = [A_m; A_text]); anything else needs an explicit `rank` (a truncated SVD of route m minus the
  merged weight per tensor) and records each tensor's relative error and the logit error on a
  probe input in `export_report.json`.
- **base + LoRA** (`lora=True, base=True`): `OUT/base`, the checkpoint form holding the merged LLM
  instead of route m (the text route, with m's encoder and connector), and `OUT/lora`, the same
  adapter under that class's module names and vocabulary: the pair vLLM's `default_mm_loras` serves.
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
from mergekit_multimodal.compose.vocab import EMBED, HEAD, TOKENIZER_FILES, load_tokenizer
from mergekit_multimodal.compose.writer import Entry, PlannedShardWriter
from mergekit_multimodal.errors import CompositionError, cli_errors
from mergekit_multimodal.families import LLM, SplitLayout, causal_lm_class, get_family
from mergekit_multimodal.format import files as F
from mergekit_multimodal.format.manifest import Manifest, ModalityEntry
from mergekit_multimodal.format.tensors import header_shapes, iter_tensors, open_stream
from mergekit_multimodal.methods.routes import iter_route

#: transformers' default shard size for save_pretrained
SHARD_SIZE = 5 * 1000**3
REPORT = "export_report.json"
#: token ids of the probe input the low-rank report measures the logit error on
PROBE_LENGTH, PROBE_SEED = 16, 0


def export(composite: str, out: str, route: str, *, lora: bool = False, rank: Optional[int] = None,
           base: bool = False, vllm: bool = False, overwrite: bool = False, shard_size: int = SHARD_SIZE) -> str:
    """Write route `route` of `composite` to `out` (a checkpoint, or with `lora` a PEFT adapter; with
    `base` too, `out/base` and `out/lora`: source m's class holding the merged LLM and the adapter
    laid out for it; with `vllm`, an adapter without what vLLM's LoRA loader refuses, the loss measured)
    and return its path; on any failure nothing is left at `out`.

    >>> export("my-composite", "my-composite-image", "image")  # doctest: +SKIP
    """
    composite = os.path.abspath(composite)
    out = os.path.abspath(out)
    manifest = Manifest.read(composite)
    entry = manifest.modality(route, composite)
    if rank is not None and not lora:
        raise CompositionError("--rank is for --lora (a low-rank adapter); a checkpoint export is exact")
    if base and not lora:
        raise CompositionError("--base is for --lora (the checkpoint an adapter applies to); a checkpoint export "
                               "of the route needs no base")
    if vllm and not lora:
        raise CompositionError("--vllm is for --lora (what vLLM's LoRA loader takes); a checkpoint export needs no "
                               "adapter")
    if rank is not None and rank < 1:
        raise CompositionError(f"--rank {rank}: must be at least 1")
    if lora:
        kinds = _lora_plan(composite, manifest, route, rank)
        if base:
            plan = _checkpoint_plan(composite, manifest, route, entry)

            def write(tmp):
                os.makedirs(tmp)
                _write_checkpoint(composite, manifest, route, entry, plan, os.path.join(tmp, "base"), shard_size,
                                  merged=True)
                _write_lora(composite, manifest, route, kinds, rank, os.path.join(tmp, "lora"), plan,
                            os.path.join(out, "base"), vllm=vllm)
        else:
            write = lambda tmp: _write_lora(composite, manifest, route, kinds, rank, tmp, vllm=vllm)  # noqa: E731
    else:
        plan = _checkpoint_plan(composite, manifest, route, entry)
        write = lambda tmp: _write_checkpoint(composite, manifest, route, entry, plan, tmp, shard_size)  # noqa: E731
    return output.write_aside(out, write, inputs=[composite], overwrite=overwrite)


# -- checkpoint ------------------------------------------------------------------------------------

class _Vocab:
    """The exported vocabulary: the source's own (its tokenizer, stored under `modalities/<m>/`, and
    its vocabulary size, padding included), each row taken from the composite's row of the same token."""

    def __init__(self, rows: int, index: List[Optional[int]], remapped: Dict[str, Tuple[int, int]],
                 borrowed: Dict[str, str]):
        self.rows = rows
        self.index = index  # exported id -> composite row; None: a padding row no token names
        self.remapped = remapped  # token -> (composite id, exported id) where they differ
        self.borrowed = borrowed  # token -> the modality whose source brought the composite's row (not m)
        self.kept = [j for j, i in enumerate(index) if i is not None]
        self.padding = [j for j, i in enumerate(index) if i is None]

    def gather(self, w: torch.Tensor) -> torch.Tensor:
        """Rows of a [composite vocabulary, ...] tensor as the exported ids hold them; a padding row is
        the mean of the kept rows (transformers' mean-resizing without its noise: as an output row its
        logit is the mean of the others', never the greedy choice)."""
        rows = w[torch.tensor([self.index[j] for j in self.kept])]
        out = w.new_empty((self.rows,) + tuple(w.shape[1:]))
        out[self.kept] = rows
        if self.padding:
            out[self.padding] = rows.float().mean(0).to(w.dtype)
        return out


class _CheckpointPlan:
    def __init__(self, cls_name: str, config: dict, entries: List[Entry], llm_names: Dict[str, str],
                 modality_names: Dict[str, str], vocab: _Vocab):
        self.cls_name, self.config, self.entries = cls_name, config, entries
        self.llm_names = llm_names  # causal-LM name (the route's) -> name in the checkpoint
        self.modality_names = modality_names  # name under modalities/<m>/ -> name in the checkpoint
        self.vocab = vocab


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
        source_config = json.load(f)
    config = json.loads(json.dumps(source_config))
    config["tie_word_embeddings"] = manifest.llm.tie_word_embeddings
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = manifest.llm.tie_word_embeddings
    # else the text fields sit at the top level (Qwen2-VL's Hub configs) or are the class's defaults: a
    # `text_config` holding only this flag would make the class build its default text model instead
    config.pop("transformers_version", None)
    try:
        cfg = cls.config_class.from_dict(config)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as exc:
        raise CompositionError(f"{where}: {entry.architecture} cannot be built from {mdir}/config.json "
                               f"({type(exc).__name__}: {exc})") from None
    vocab = _source_vocab(path, manifest, m, entry, SplitLayout(family).placeholder_key(source_config, m),
                          source_config, cfg.get_text_config().vocab_size, where)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    llm = header_shapes(path, "model")
    stored = header_shapes(mdir, "model")
    layout = SplitLayout(family)
    entries, llm_names, modality_names = [], {}, {}
    for key, shape in expected.items():
        part, name = layout.classify(key)
        if part == LLM:
            if name == HEAD and manifest.llm.tie_word_embeddings:
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
        got = tuple(have[0])
        if part == LLM and name in (EMBED, HEAD):  # rows: the composite's vocabulary, gathered into the source's
            got = (vocab.rows,) + got[1:]
        if got != shape:
            raise CompositionError(f"{where}: tensor {name!r} in {src} is {list(have[0])}; {entry.architecture} "
                                   f"holds {key!r} as {list(shape)}")
        entries.append(Entry(key, shape, _st_dtype(have[1])))
    extra = sorted(set(stored) - set(modality_names)) + sorted(set(llm) - set(llm_names) - {HEAD})
    if extra:
        raise CompositionError(f"{where}: {entry.architecture} has no place for tensor {extra[0]!r} "
                               f"({len(extra)} such); refusing to drop part of the route")
    return _CheckpointPlan(entry.architecture, config, entries, llm_names, modality_names, vocab)


def _source_vocab(path: str, manifest: Manifest, m: str, entry: ModalityEntry, placeholder_key: Optional[str],
                  source_config: dict, rows: int, where: str) -> _Vocab:
    """Exported id -> composite row, for the source's own tokenizer (stored with its processor files):
    base ids are the composite's; a token the source added takes the composite's row of that token (its
    placeholder: the composite's placeholder of m, whatever the composite calls it); an id no token
    names is padding. Checked before anything is written."""
    mdir = os.path.join(path, entry.path)
    source = load_tokenizer(mdir)
    if source is None:
        raise CompositionError(
            f"{where}: {mdir} holds no tokenizer of the source (composed by an earlier version, or the source "
            "ships none), so the source's own vocabulary cannot be written; compose it again with this version")
    composite = load_tokenizer(path)
    v0 = manifest.llm.base_vocab_size
    names = {i: t for t, i in source.get_vocab().items()}
    composite_ids = composite.get_vocab() if composite is not None else {}
    added = {a.token: a for a in manifest.added_tokens}
    placeholder_id = source_config.get(placeholder_key) if placeholder_key else None
    added_ids = {a.id for a in manifest.added_tokens}
    index, remapped, borrowed = [], {}, {}
    for i in range(rows):
        token = names.get(i)
        if i == placeholder_id and entry.placeholder_id is not None:
            # m's placeholder takes the composite's placeholder row of m, also where the source's id is a
            # base id another modality's placeholder holds in the composite (MedGemma's <image_soft_token>)
            row, owner = entry.placeholder_id, m
        elif i < v0 and not (token is None and i in added_ids):
            # the shared rows (merged as one vocabulary; a source may name a reserved one its own way); a base
            # row the source leaves unnamed that the composite gave to a token it added is padding here
            index.append(i)
            continue
        elif token is None:
            index.append(None)
            continue
        elif token in added:
            row, owner = added[token].id, added[token].from_
        elif composite_ids.get(token, v0) < v0:
            row, owner = composite_ids[token], m
        else:
            raise CompositionError(f"{where}: the source's token {token!r} (id {i}) has no row in the composite "
                                   f"({path}); refusing to write a row it does not hold")
        index.append(row)
        if row != i:
            remapped[token] = (row, i)
        if owner != m:
            borrowed[token] = owner
    return _Vocab(rows, index, remapped, borrowed)


def _write_checkpoint(path: str, manifest: Manifest, m: str, entry: ModalityEntry, plan: _CheckpointPlan,
                      out: str, shard_size: int, merged: bool = False) -> None:
    """Route m's checkpoint; `merged`: the same class holding the merged LLM (an adapter's base)."""
    os.makedirs(out)
    dtypes = {e.name: e.dtype for e in plan.entries}
    writer = PlannedShardWriter(out, plan.entries, shard_size)
    try:
        merged_llm = ((name, w) for _, name, w in iter_tensors(path, "model"))  # the text route
        for name, w in (merged_llm if merged else iter_route(path, m)):
            output.check_signals()
            if name in plan.llm_names:
                key = plan.llm_names[name]
                writer.write(key, (plan.vocab.gather(w) if name in (EMBED, HEAD) else w).to(dtypes[key]))
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
    mdir = os.path.join(path, entry.path)
    _copy(path, out, F.BASE_FILES)
    _copy(mdir, out, TOKENIZER_FILES + F.PROCESSOR_FILES)  # the source's own tokenizer and processor
    what = (f"`{plan.cls_name}` checkpoint holding the composite's merged LLM (the text route), the base of "
            f"modality `{m}`'s adapter" if merged else f"`{plan.cls_name}` checkpoint")
    _write_card(out, manifest, m, entry, what, _vocab_text(plan.vocab, manifest, m))


def _copy(src_dir: str, out: str, names) -> None:
    for name in names:
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), os.path.join(out, name))


def _vocab_text(vocab: _Vocab, manifest: Manifest, m: str) -> str:
    """The card's account of the exported vocabulary: what is remapped, borrowed or padding."""
    lines = [f"Token ids are the source's own (its tokenizer is included; vocabulary size {vocab.rows}). Rows "
             f"0-{manifest.llm.base_vocab_size - 1} are the base vocabulary's."]
    for token, (row, i) in vocab.remapped.items():
        lines.append(f"- `{token}` (id {i}): the composite's row {row}, moved to the source's id.")
    for token, owner in vocab.borrowed.items():
        lines.append(f"- `{token}`: the composite keeps one row per token and took this one from modality "
                     f"`{owner}`'s source, not from this route's source.")
    if vocab.padding:
        lines.append(f"- ids {_ranges(vocab.padding)}: padding rows no token names (the source pads its vocabulary; "
                     "the composite does not store those rows): each is the mean of the other rows, so its logit is "
                     "their mean and never the greedy choice.")
    return "\n".join(lines) + "\n"


def _ranges(ids: List[int]) -> str:
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _write_card(out: str, manifest: Manifest, m: str, entry: ModalityEntry, what: str, vocab_text: str,
                extra: str = "") -> None:
    from huggingface_hub import ModelCardData

    sources = [manifest.base_model] + [e.source for e in manifest.modalities.values()]
    ids = hub_ids(sources)
    data = ModelCardData(base_model=ids or None, base_model_relation="merge" if ids else None,
                         library_name="peft" if "LoRA" in what else "transformers",
                         tags=["merge", "mergekit-multimodal", manifest.merge_method, f"route-{m}"])
    listed = "\n".join(f"- `{s}`" for s in sources)
    text = f"""---
{data.to_yaml()}
---
# Route `{m}` of a mergekit-multimodal composite

A {what} of modality `{m}`'s route: its source `{entry.source}` ({entry.architecture}) with the LLM
weights the composite's **{manifest.merge_method}** method gives that route (docs/serving.md of
mergekit-multimodal). The whole request runs on this route. Composite sources (base first):

{listed}

{vocab_text}{extra}"""
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
        linear = isinstance(module, torch.nn.Linear)
        kinds[name] = ("linear" if linear and name.endswith(".weight") else
                       "bias" if linear and name.endswith(".bias") else  # Qwen2's q/k/v_proj
                       "embedding" if isinstance(module, torch.nn.Embedding) else "other")
    if rank is None:
        from mergekit_multimodal.methods.damc.runtime import LowRankDelta  # the only exact low-rank route

        for name in kinds:
            d = method.read_deltas(path, manifest, list(manifest.modalities), torch.float32, only=(name,)).get(name)
            if d is None:
                continue
            if kinds[name] not in ("other", "bias") and not (isinstance(d, LowRankDelta) and kinds[name] == "linear"):
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


def _write_lora(path: str, manifest: Manifest, m: str, kinds: Dict[str, str], rank: Optional[int], out: str,
                layout: Optional[_CheckpointPlan] = None, base_path: Optional[str] = None, vllm: bool = False) -> None:
    """The adapter over the merged LLM: as a causal LM (the composite's root, composite ids), or with
    `layout` over source m's class holding the merged LLM (`base_path`; its module names and the
    source's vocabulary, rows gathered as the base's are). `vllm`: the route's whole weights (norms,
    biases), which vLLM's loader refuses, left out, and the logit error that costs measured."""
    from peft import LoraConfig

    from mergekit_multimodal.methods import get_method

    os.makedirs(out)
    method = get_method(manifest.merge_method)
    route = manifest.route_ids()[m]
    shapes = header_shapes(path, "model")
    factors, errors, whole, biases = {}, {}, {}, {}
    merged = open_stream(path, "model")
    for name, kind in kinds.items():  # one tensor's delta at a time; the factors are low-rank
        output.check_signals()
        delta = method.read_deltas(path, manifest, list(manifest.modalities), torch.float32, only=(name,)).get(name)
        if delta is None or (layout is not None and name not in layout.llm_names):
            continue  # (a tied head: the class takes it from the embedding)
        dtype = _st_dtype(shapes[name][1])
        if kind == "other":  # a norm: LoRA has no form for it; PEFT keeps the route's whole weight (modules_to_save)
            whole[name] = delta.apply(merged.get_tensor(name).float(), route).to(dtype)
            continue
        if kind == "bias":  # a LoRA layer's bias: PEFT keeps the route's whole bias on it (bias="lora_only")
            biases[name] = delta.apply(merged.get_tensor(name).float(), route).to(dtype)
            continue
        a, b, err = _factors(delta, route, kind, rank)
        if layout is not None and kind == "embedding":  # delta^T = B A: A's columns are the vocabulary's rows
            a = layout.vocab.gather(a.T).T
        elif layout is not None and name == HEAD:  # delta = B A: B's rows
            b = layout.vocab.gather(b)
        factors[name] = (kind, a.to(dtype), b.to(dtype))
        errors[name] = err
    merged.flush()
    for name in biases:  # a bias whose weight the route leaves as it is: zero factors make its layer a LoRA layer
        weight = name[:-len("bias")] + "weight"
        if weight not in factors:
            (rows, cols), dtype = shapes[weight][0], _st_dtype(shapes[weight][1])
            factors[weight] = ("linear", torch.zeros(1, cols, dtype=dtype), torch.zeros(rows, 1, dtype=dtype))
            errors[weight] = 0.0
    module_of = ((lambda n: layout.llm_names[n].rsplit(".", 1)[0]) if layout is not None else
                 (lambda n: n.rsplit(".", 1)[0]))
    r = max((a.shape[0] for _, a, _ in factors.values()), default=1)
    tensors, targets = {}, []
    for name, (kind, a, b) in factors.items():
        module = module_of(name)
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
    left_out = sorted(whole) + sorted(biases) if vllm else []
    if vllm:
        whole, biases = {}, {}
    for name, w in whole.items():
        tensors[f"base_model.model.{module_of(name)}.weight"] = w.contiguous()
    for name, w in biases.items():  # where PEFT's bias="lora_only" saves a LoRA layer's bias
        tensors[f"base_model.model.{module_of(name)}.base_layer.bias"] = w.contiguous()
    if not tensors:
        raise CompositionError(f"{path}: route {m!r} equals the merged LLM on every tensor a LoRA adapter can hold"
                               f"{' (--vllm left out its whole weights)' if left_out else ''}; there is nothing to export")
    from safetensors.torch import save_file  # the adapter is low-rank: one file, as PEFT writes it

    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=r, target_modules=sorted(targets), lora_dropout=0.0, bias="lora_only" if biases else "none",
               modules_to_save=sorted(module_of(n) for n in whole) or None,
               task_type="CAUSAL_LM" if layout is None else None,
               # a tied head is the embedding: PEFT ties the head's adapter to the embedding's
               ensure_weight_tying=manifest.llm.tie_word_embeddings and any(k == "embedding" for k, _, _ in factors.values()),
               base_model_name_or_path=base_path or path).save_pretrained(out)
    entry = manifest.modalities[m]
    if layout is None:
        _copy(path, out, TOKENIZER_FILES)
    else:
        _copy(os.path.join(path, entry.path), out, TOKENIZER_FILES)
    exact = rank is None and not left_out
    report = {"composite": path, "route": m, "merge_method": manifest.merge_method, "rank": r, "exact": exact,
              "relative_error": errors, "whole_weights": sorted(whole) + sorted(biases), "left_out": left_out,
              "vllm": _vllm_view(tensors, whole, biases, manifest.llm.tie_word_embeddings)}
    if not exact:
        report["probe"] = _probe_error(path, m, out, layout, os.path.join(os.path.dirname(out), "base"))
    with open(os.path.join(out, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    worst = max(errors.values(), default=0.0)
    note = ("Exact: route m's LLM weights are the base's merged LLM plus this adapter." if exact else
            f"Approximate (rank {r}{', without ' + str(len(left_out)) + ' whole weights vLLM refuses' if left_out else ''})"
            f": largest relative error per tensor {worst:.4g}, relative logit error on a probe input "
            f"{report['probe']['relative_error']:.4g}; per tensor in `{REPORT}`.")
    note += "".join(f"\n\nvLLM would refuse this adapter: {why}" for why in report["vllm"]["rejected"])
    note += "".join(f"\n\nvLLM: {why}" for why in report["vllm"]["notes"])
    if layout is None:
        _write_card(out, manifest, m, entry, "PEFT LoRA adapter (over the composite's merged LLM)",
                    "Token ids are the composite's (its tokenizer is included).\n",
                    extra=f"\n{note} Base model: the composite directory's merged LLM ({_base_class(path)}). "
                          "The adapter holds the LLM route only; the encoder and connector are the composite's "
                          f"`modalities/{m}/`.\n")
    else:
        _write_card(out, manifest, m, entry, f"PEFT LoRA adapter (over `{layout.cls_name}` holding the composite's "
                    "merged LLM, `../base`)", _vocab_text(layout.vocab, manifest, m),
                    extra=f"\n{note} Base model: `../base` (source `{m}`'s class with the merged LLM, the text route); "
                          "serve both with vLLM's `--default-mm-loras` (docs/serving.md).\n")


def _base_class(path: str) -> str:
    """How the card names the class that loads the composite's root (the plain adapter's base)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    if type(cfg) in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING:
        return "`AutoModelForCausalLM`"
    return (f"`{causal_lm_class(cfg).__name__}`, from `mergekit_multimodal.families.causal_lm_class`: transformers "
            f"has no causal-LM class for `{cfg.model_type}`")


def _vllm_view(tensors: Dict[str, torch.Tensor], whole: Dict[str, torch.Tensor], biases: Dict[str, torch.Tensor],
               tied: bool) -> Dict[str, List[str]]:
    """Why vLLM would refuse the written adapter (`rejected`), and what it depends on or drops (`notes`), as
    vLLM's LoRA loader reads an adapter (docs/serving.md names its files, commits and lines): PEFTHelper
    refuses `modules_to_save`; parse_fine_tuned_lora_name takes only `lora_A`/`lora_B` weights and
    `lora_embedding_A`/`lora_embedding_B`, and refuses any other tensor."""
    rejected, notes = [], []
    if whole:
        rejected.append(f"adapter_config.json lists modules_to_save ({len(whole)} routed norm weights kept whole, e.g. "
                        f"`{sorted(whole)[0]}`): vLLM's PEFTHelper takes only modules_to_save = None (vllm/lora/"
                        "peft_helper.py). `--vllm` leaves them out and reports what that costs.")
    if biases:
        rejected.append(f"{len(biases)} routed biases kept whole (bias=\"lora_only\", `<module>.base_layer.bias`, e.g. "
                        f"`{sorted(biases)[0]}`): vLLM parses only lora_A/lora_B weights and lora_embedding_A/B "
                        "(vllm/lora/utils.py parse_fine_tuned_lora_name). `--vllm` leaves them out and reports what "
                        "that costs.")
    if any(k.endswith(".lora_embedding_A") or ".lm_head." in k for k in tensors):
        notes.append("the embedding / head factors load only where vLLM's language-model class lists `embed_tokens` / "
                     "`lm_head` in its `embedding_modules` (LlamaForCausalLM, MistralForCausalLM do; Qwen2ForCausalLM, "
                     "the language model of its Qwen2-VL, Qwen2.5-VL and Qwen2-Audio classes, does not: vLLM refuses "
                     "the adapter there, vllm/lora/lora_model.py check_unexpected_modules).")
    if tied and any(k.endswith(".lora_embedding_A") for k in tensors):
        notes.append("the composite ties the head to the embedding; PEFT applies the embedding factors to the head too "
                     "(`ensure_weight_tying`), a field vLLM's PEFTHelper does not read: vLLM gets no head factors.")
    return {"rejected": rejected, "notes": notes}


def _probe_error(path: str, m: str, adapter: str, layout: Optional[_CheckpointPlan] = None,
                 base_path: Optional[str] = None) -> Dict[str, float]:
    """The adapter over its base against route m itself, on fixed token ids of the base vocabulary
    (the same ids in both vocabularies; with `layout` the logits compared column by column through
    its vocabulary's index)."""
    from peft import PeftModel

    from mergekit_multimodal.runtime import CompositeModel

    model = CompositeModel.from_pretrained(path, modalities=[])
    ids = torch.randint(0, model.manifest.llm.base_vocab_size, (1, PROBE_LENGTH),
                        generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad(), model.route(m):
        want = model(ids).logits.float()
    del model
    if layout is None:
        base = (causal_lm_class(transformers.AutoConfig.from_pretrained(path)) or transformers.AutoModelForCausalLM
                ).from_pretrained(path, dtype=torch.float32)
    else:
        base = getattr(transformers, layout.cls_name).from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits.float()
    if layout is not None:
        got = got[..., layout.vocab.kept]
        want = want[..., [layout.vocab.index[j] for j in layout.vocab.kept]]
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
@click.option("--base", is_flag=True,
              help="with --lora: OUT/base (source ROUTE's class holding the merged LLM, the text route) and OUT/lora "
                   "(the adapter laid out for it), the pair vLLM's --default-mm-loras serves")
@click.option("--vllm", is_flag=True,
              help="with --lora: leave out what vLLM's LoRA loader refuses (whole norm weights, biases); the logit "
                   "error that costs is measured and reported")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--debug", is_flag=True, help="show the traceback of an error")
def main(composite, out, route, lora, rank, base, vllm, overwrite, debug):
    """Export route ROUTE of COMPOSITE to OUT: its source's own transformers checkpoint, or (--lora)
    a PEFT adapter over the merged LLM. docs/serving.md shows how to serve the result."""
    with cli_errors(1, debug):
        path = export(composite, out, route, lora=lora, rank=rank, base=base, vllm=vllm, overwrite=overwrite)
        if lora:
            file = os.path.join(path, "lora" if base else "", REPORT)
            with open(file, encoding="utf-8") as f:
                report = json.load(f)
            if not report["exact"]:
                worst = max(report["relative_error"].values(), default=0.0)
                left = f", {len(report['left_out'])} whole weights left out for vLLM" if report["left_out"] else ""
                click.echo(f"rank {report['rank']}{left}: largest relative error per tensor {worst:.4g}, probe logit "
                           f"relative error {report['probe']['relative_error']:.4g} (per tensor: {file})")
            for why in report["vllm"]["rejected"]:
                click.echo(f"warning: vLLM would refuse this adapter: {why}", err=True)
        click.echo(path)
