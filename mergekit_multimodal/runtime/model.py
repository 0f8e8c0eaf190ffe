"""`CompositeModel`: a composite directory run as one multimodal model.

The merged LLM is loaded with transformers (`AutoModelForCausalLM`, or a family's `load_llm` where
transformers has no causal-LM class for it: Qwen2-VL); for MMER every linear layer becomes a
`RoutedLinear`; each modality's encoder is rebuilt from its stored config. A forward replaces each
placeholder token, in prompt order, by that item's features (one placeholder per image / clip /
video; the model expands it to as many positions as the item has features), and tokens at those
positions take their modality's route; every other token takes the text route. A family that
computes the LLM's positions from its items (`llm_positions`: Qwen2-VL's 3-D rotary positions) gets
them for the expanded sequence.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import transformers
from torch import nn

from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import get_family
from mergekit_multimodal.format.manifest import Manifest
from mergekit_multimodal.format.tensors import check_finite, header_shapes, refuse_incomplete, weights_file
from mergekit_multimodal.methods import get_method
from mergekit_multimodal.runtime.encoders import ModalityEncoder
from mergekit_multimodal.runtime.routing import RouteState, cache_budget, install_routes

Media = Mapping[str, Mapping[str, torch.Tensor]]  # modality -> processor outputs for its items


def _method(manifest: Manifest):
    return get_method(manifest.merge_method)


def auto_route(manifest: Manifest, modalities) -> Optional[str]:
    """The route `--route auto` picks: the one modality of an input whose items are all of one
    modality, when the composite's routes rebuild each source's own parameters (the method's
    `whole_input_routes`: MMER); else None, per-token routing. DAMC stays per-token: its text
    tokens need the text adapters."""
    mods = set(modalities)
    if len(mods) == 1 and manifest.routes and get_method(manifest.routes.kind).whole_input_routes:
        (m,) = mods
        return m if m in manifest.modalities else None
    return None


def resolve_route(route: Optional[str], manifest: Manifest, modalities) -> Optional[str]:
    """A route option for one input: "auto" -> `auto_route`; None or "per-token" -> None (per-token
    routing); a modality name as given."""
    if route == "auto":
        return auto_route(manifest, modalities)
    return None if route == "per-token" else route


def resolve_device(device) -> torch.device:
    """A `--device` / `device=` value as a torch device: None or "auto" -> cuda when available, else
    cpu; a name torch does not know, or an accelerator this machine lacks, is a CompositionError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CompositionError(f"device {device!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cpu" and callable(available) and not available():
        raise CompositionError(f"device {device!r}: this machine has no {dev.type} device (torch sees none)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CompositionError(f"device {device!r}: this machine has {torch.cuda.device_count()} cuda device(s)")
    return dev


class CompositeModel(nn.Module):
    def __init__(self, path: str, llm: transformers.PreTrainedModel, encoders: Dict[str, ModalityEncoder],
                 manifest: Manifest, state: RouteState):
        super().__init__()
        self.path, self.llm, self.encoders, self.manifest, self.state = path, llm, encoders, manifest, state
        self.modalities: List[str] = list(manifest.modalities)
        self.placeholder_ids = {m: manifest.modalities[m].placeholder_id for m in self.modalities}
        self.route_of = manifest.route_ids()
        self.embed_delta: Optional[nn.Module] = None  # resident only for a tied head, else read by route()
        self._embed_name = ""
        #: DAMC: learned embeddings placed before / after each item's features, on its modality's route
        self.affixes: Dict[str, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        #: Mistral3: the token ids put after each row of an image's features and after its last row
        self.row_tokens: Dict[str, Tuple[int, int]] = {}
        #: the modalities whose family gives the LLM its own attention mask over their features
        #: (Gemma 3: bidirectional within an image), and that mask function (`Family.llm_mask`)
        families = {m: get_family(manifest.modalities[m].family, path, modality=m) for m in self.modalities}
        masks = {m: f.llm_mask for m, f in families.items()}
        self.masked = frozenset(m for m, fn in masks.items() if fn is not None)
        fns = {masks[m] for m in self.masked}
        if len(fns) > 1:
            raise CompositionError(f"{path}: modalities {sorted(self.masked)} come from families with different "
                                   f"attention masks over their features; one composite can apply only one")
        self.llm_mask = fns.pop() if fns else None
        #: modality -> the media key counting each prompt's items (`Family.items_by_prompt`)
        self.by_prompt = {m: f.items_by_prompt for m, f in families.items() if f.items_by_prompt}
        #: the LLM's positions from the items' layout (`Family.llm_positions`: Qwen2-VL's 3-D rotary
        #: positions), the modalities it lays out, and the per-row offsets it gave the last prefill
        self.positions, self.positioned = _one_hook(path, families, "llm_positions", "position")
        self.position_deltas: Optional[torch.Tensor] = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, device=None,
                        device_map=None, modalities: Optional[Sequence[str]] = None,
                        route_cache: Union[None, int, float, str] = None) -> "CompositeModel":
        """Load a composite; `device` (or a single-device `device_map`) places LLM and encoders.

        `modalities` limits which encoders are loaded (all by default). `route_cache` trades memory
        for speed: built route weights stay resident, most-used routes first, up to that many bytes
        (+1x the routed linear weights per route kept) instead of being rebuilt per forward. None or
        "auto": on CUDA what fits with headroom (`routing.cache_budget`), elsewhere nothing; "all":
        every route; or a size ("8GiB", bytes as an int).
        """
        cfg = Manifest.read(path)
        try:
            cache_budget(route_cache, torch.device("cpu"))  # a bad size fails before anything loads
        except ValueError as exc:
            raise CompositionError(str(exc)) from None
        if device is None and isinstance(device_map, (str, torch.device)):
            device = device_map
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise CompositionError("device_map must name one device (e.g. 'cuda:0' or 'auto'); "
                                   "splitting a composite across devices is not supported")
        # "auto": one device; the composite's routes are not split across devices
        device = resolve_device(device) if device is not None else torch.device("cpu")
        prev = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # its load report: refuse_incomplete says it in one line
        families = {m: get_family(info.family, path, modality=m) for m, info in cfg.modalities.items()}
        load_llm, owners = _one_hook(path, families, "load_llm", "language model")
        try:
            if load_llm is not None:  # a family whose LLM has no causal-LM class in transformers (Qwen2-VL)
                llm, info = load_llm(path, [os.path.join(path, cfg.modalities[m].path) for m in owners], torch_dtype)
            else:
                llm, info = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True)
        except CompositionError:
            raise
        except Exception as exc:
            raise CompositionError(f"{path}: the merged LLM does not load ({type(exc).__name__}: {exc})") from None
        finally:
            transformers.utils.logging.set_verbosity(prev)
        # never run on random weights: every tensor of the config is in the files, with its shape
        refuse_incomplete(info, weights_file(path), "the merged LLM")
        state = RouteState()
        embed_delta = None
        embed_name = _embedding_param_name(llm)
        tied = bool(llm.config.tie_word_embeddings)
        if cfg.routes:
            # the route files must fit the merged LLM (headers only), before any is read
            _method(cfg).check_routes(path, cfg, header_shapes(path, "model"))
            # The embedding's delta only serves whole-input routes (modality tokens have no
            # embeddings), so it is read when `route()` is entered, unless a tied head needs it.
            skip = () if tied else (embed_name,)
            deltas = _method(cfg).read_deltas(path, cfg, list(cfg.modalities), llm.dtype, skip=skip)
            embed_delta = deltas.get(embed_name)
            if tied and embed_delta is not None:
                deltas.setdefault("lm_head.weight", embed_delta)  # a tied head follows its embedding
            install_routes(llm, deltas, state)
        llm.to(device).eval()
        encoders = {}
        for m in (cfg.modalities if modalities is None else modalities):
            info = cfg.modalities[m]
            encoders[m] = ModalityEncoder(m, info.family, os.path.join(path, info.path), llm.dtype, device)
        model = cls(path, llm, encoders, cfg, state)
        state.cache.budget = cache_budget(route_cache, device)  # "auto" reads the free memory now
        model.embed_delta = embed_delta.to(device) if embed_delta is not None else None
        model._embed_name = embed_name
        model.row_tokens = _row_tokens(path, cfg, encoders)
        for m, info in cfg.modalities.items():
            if info.prefix_suffix:
                model.affixes[m] = _read_affixes(os.path.join(path, info.prefix_suffix), llm.dtype, device,
                                              llm.get_input_embeddings().weight.shape[1])
        return model

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def to(self, *args, **kwargs):
        self.llm.to(*args, **kwargs)
        for enc in self.encoders.values():
            enc.model.to(*args, **kwargs)
        return self

    # -- routing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, modality: Optional[str]):
        """Run every token on one modality's route (MMER retention use); None = per-token routing."""
        if modality is not None and modality not in self.route_of:
            raise CompositionError(f"no route {modality!r}; routes: {', '.join(self.route_of) or 'none (not MMER)'}")
        old, old_embed = self.state.whole, self.embed_delta
        self.state.whole = self.route_of.get(modality) if modality else None
        if self.state.whole and self.embed_delta is None:  # read now, dropped on exit (see from_pretrained)
            found = _method(self.manifest).read_deltas(self.path, self.manifest, self.modalities, self.dtype,
                                                       only=(self._embed_name,))
            self.embed_delta = found[self._embed_name].to(self.device) if found else None
        # every embedding lookup inside (the prompt and each generated token) takes the route's rows
        hook = self.llm.get_input_embeddings().register_forward_hook(self._route_embedding_rows) \
            if self.state.whole and old is None else None
        try:
            yield self
        finally:
            if hook is not None:
                hook.remove()
            self.state.whole, self.embed_delta = old, old_embed

    # -- inputs ----------------------------------------------------------------------------------
    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       media: Optional[Media] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings with every placeholder expanded into its item's features, the (left-padded)
        attention mask, and each position's route id."""
        return self._prepare(input_ids, attention_mask, media)[:3]

    def _prepare(self, input_ids, attention_mask, media):
        """`prepare_inputs`, plus a [batch, positions] mask of the features whose family gives the
        LLM its own attention over them (`Family.llm_mask`), and the LLM's position ids when a family
        computes them (`Family.llm_positions`; else None)."""
        media = media or {}
        for m in media:
            if m not in self.encoders:
                raise CompositionError(f"the composite has no modality {m!r}; it has {', '.join(self.encoders)}")
        feats = {m: self.encoders[m].features(media[m]) for m in media}
        grids = {m: self.encoders[m].grids(media[m]) for m in media if m in self.row_tokens}
        embed = self._embed
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for m, key in self.by_prompt.items():
            if m in media and key in media[m]:
                held = ((input_ids == self.placeholder_ids[m]) & attention_mask.bool()).sum(-1).tolist()
                counted = [int(n) for n in media[m][key]]
                if counted != [n for n in held if n]:
                    raise CompositionError(
                        f"modality {m!r}: its media's {key} {counted} does not match the prompts' {m} items per prompt "
                        f"{held}; its source lays out an image by how many share its prompt, so build the media "
                        f"with CompositeProcessor for these prompts")
        rows, routes, owns, spans = [], [], [], []
        cursor = {m: 0 for m in feats}
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            pieces, route, own, span = [], [], [], []
            start, at = 0, 0
            def text(ids_):  # noqa: E306
                pieces.append(embed(ids_.to(self.device)))
                route.append(torch.zeros(len(ids_), dtype=torch.long))
                own.append(torch.zeros(len(ids_), dtype=torch.long))
                return len(ids_)
            for pos, tok in enumerate(ids.tolist()):
                m = next((m for m, pid in self.placeholder_ids.items() if pid == tok), None)
                if m is None:
                    continue
                if m not in feats or cursor[m] >= len(feats[m]):
                    given = len(feats.get(m, []))
                    raise CompositionError(f"the prompt has more {m!r} placeholders than the {given} {m} item(s) given")
                if pos > start:
                    at += text(ids[start:pos])
                f = feats[m][cursor[m]].to(self.device, self.dtype)
                if m in self.row_tokens:
                    f = self._break_rows(m, f, grids[m][cursor[m]], embed)
                if m in self.affixes:  # DAMC: prefix + features + suffix, all on the modality's route
                    f = torch.cat([t for t in (self.affixes[m][0], f, self.affixes[m][1]) if t is not None])
                span.append((at, at + f.shape[0], m, cursor[m]))
                at += f.shape[0]
                cursor[m] += 1
                pieces.append(f)
                route.append(torch.full((f.shape[0],), self.route_of.get(m, 0), dtype=torch.long))
                own.append(torch.full((f.shape[0],), int(m in self.masked), dtype=torch.long))
                start = pos + 1
            if start < len(ids):
                at += text(ids[start:])
            rows.append(torch.cat(pieces))
            routes.append(torch.cat(route))
            owns.append(torch.cat(own))
            spans.append(span)
        for m, n in cursor.items():
            if n != len(feats[m]):
                raise CompositionError(f"{len(feats[m])} {m} item(s) given but the prompt has {n} {m!r} placeholder(s)")
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[-1]
        embeds = torch.zeros(len(rows), width, hidden, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        route_ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        own_mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, (r, rt, o) in enumerate(zip(rows, routes, owns)):  # left padding, as generation needs
            embeds[b, width - r.shape[0]:] = r
            mask[b, width - r.shape[0]:] = 1
            route_ids[b, width - r.shape[0]:] = rt.to(self.device)
            own_mask[b, width - r.shape[0]:] = o.to(self.device)
        items = [(b, width - r.shape[0] + s, width - r.shape[0] + e, m, i)
                 for b, (r, span) in enumerate(zip(rows, spans)) for s, e, m, i in span if m in self.positioned]
        positions = None
        if items:  # the family's positions for its items (text-only prompts: the plain positions equal them)
            positions, self.position_deltas = self.positions(
                {m: self.encoders[m] for m in self.positioned if m in self.encoders}, media, items, mask)
        return embeds, mask, route_ids, own_mask, positions

    def _break_rows(self, m: str, f: torch.Tensor, grid: Tuple[int, int], embed) -> torch.Tensor:
        """An image's features laid out as its source's processor lays out its tokens: each row of
        features followed by the row-break token, the last row by the end token."""
        rows, cols = grid
        if rows * cols != f.shape[0]:
            raise CompositionError(f"modality {m!r}: an image gave {f.shape[0]} features, not the {rows} x {cols} "
                                   f"grid its image_sizes imply; pass the image processor's own image_sizes")
        brk, end = embed(torch.tensor(self.row_tokens[m], device=self.device)).to(f.dtype)
        marks = torch.cat([brk.expand(rows - 1, -1), end[None]])  # [rows, hidden]
        return torch.cat([f.reshape(rows, cols, -1), marks[:, None]], dim=1).reshape(rows * (cols + 1), -1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-token embeddings: merged rows, or the chosen route's rows when one route is forced
        (the embedding's hook adds them, for the prompt and for every generated token alike)."""
        return self.llm.get_input_embeddings()(ids)

    def _route_embedding_rows(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the LLM's input embedding, installed by `route(m)` only: every lookup (the
        prompt's text and each token `generate` feeds back) takes route m's rows, as the source would."""
        if self.state.whole and self.embed_delta is not None:
            rows = self.embed_delta.rows(self.state.whole, args[0]).to(output.dtype)
            scale = getattr(module, "embed_scale", None)  # scaled embeddings (Gemma's x sqrt(hidden)) scale rows too
            if scale is not None:
                rows = rows * torch.as_tensor(scale, dtype=output.dtype, device=output.device)
            return output + rows
        return output

    # -- running ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                media: Optional[Media] = None, **kwargs):
        embeds, mask, route_ids, own, positions = self._prepare(input_ids, attention_mask, media)
        # transformers 5.24 passes the KV cache as `cache` (`past_key_values` is deprecated, gone in 5.40)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if "position_ids" not in kwargs and cache is None:
            if positions is None:
                self.position_deltas = None
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: a row scores as alone
            kwargs["position_ids"] = positions
        elif "position_ids" not in kwargs and self.position_deltas is not None and positions is None:
            # a cached step after a prefill whose family computed the positions: continue them (the
            # source's rope_deltas: position = cached length + offset)
            past = cache.get_seq_length()
            steps = torch.arange(past, past + embeds.shape[1], device=self.device)[None]
            kwargs["position_ids"] = steps + self.position_deltas.to(self.device)
        attn = self._attention(embeds, mask, kwargs.get("position_ids"), cache, own)
        self.state.set_tokens(route_ids)
        try:
            return self.llm(inputs_embeds=embeds, attention_mask=attn, **kwargs)
        finally:
            self.state.set_tokens(None)

    def _attention(self, embeds, mask, position_ids, cache, own):
        """The LLM's attention mask: the 2-D padding mask, or the family's own masks when some
        features take a non-causal attention (`Family.llm_mask`)."""
        if self.llm_mask is None or not bool(own.any()):
            return mask
        return self.llm_mask(self.llm, embeds, mask, position_ids, cache, own)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 media: Optional[Media] = None, **generate_kwargs) -> torch.Tensor:
        """transformers' generate on the expanded embeddings; returns only the new token ids.

        The prefill routes each token; cached decoding steps see one new position, which does not
        match the prefill's route map, so generated tokens take the text route. Under `route(m)`
        every token, generated ones included (weights and embedding rows), runs on route m.
        """
        embeds, mask, route_ids, own, positions = self._prepare(input_ids, attention_mask, media)
        if positions is not None and "position_ids" not in generate_kwargs:
            # as the source's generate: the text positions first (its masks), then the family's; each
            # new token continues every row by one
            text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            generate_kwargs["position_ids"] = torch.cat([text[None], positions.to(text.device)])
        hook = None
        if self.llm_mask is not None and bool(own.any()):
            def prefill_mask(module, args, kwargs):  # the prompt's step (its embeddings) takes the family's masks
                if kwargs.get("inputs_embeds") is not None and not isinstance(kwargs.get("attention_mask"), dict):
                    kwargs["attention_mask"] = self._attention(kwargs["inputs_embeds"], kwargs.get("attention_mask"),
                                                               kwargs.get("position_ids"), kwargs.get("cache"), own)
                return args, kwargs

            hook = self.llm.register_forward_pre_hook(prefill_mask, with_kwargs=True)
        self.state.set_tokens(route_ids)
        try:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        finally:
            self.state.set_tokens(None)
            if hook is not None:
                hook.remove()


def _one_hook(path: str, families, hook: str, what: str):
    """The one function some modalities' families give for `hook` (`Family.load_llm`, `llm_positions`)
    and those modalities; (None, ()) when none does. Two different ones cannot both run."""
    owners = tuple(m for m, f in families.items() if getattr(f, hook) is not None)
    fns = {getattr(families[m], hook) for m in owners}
    if len(fns) > 1:
        raise CompositionError(f"{path}: modalities {list(owners)} come from families ({', '.join(sorted({families[m].name for m in owners}))}) "
                               f"that each run the merged LLM's {what} their own way; one composite can run only one")
    return (fns.pop() if fns else None), owners


def _row_tokens(path: str, cfg: Manifest, encoders: Dict[str, ModalityEncoder]) -> Dict[str, Tuple[int, int]]:
    """Modality -> (row-break id, end id) in the composite's vocabulary, for the families whose
    image prompts break rows (Mistral3). Token names come from the source's processor_config.json
    (PixtralProcessor's defaults otherwise)."""
    import json

    wanted = [m for m, enc in encoders.items() if enc.breaks_rows]
    if not wanted:
        return {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CompositionError(f"{path}: the composite's tokenizer does not load ({type(exc).__name__}: {exc}); "
                               f"modalities {wanted} need it for their row-break tokens") from None
    out = {}
    for m in wanted:
        names = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        pc = os.path.join(path, cfg.modalities[m].path, "processor_config.json")
        if os.path.isfile(pc):
            with open(pc, encoding="utf-8") as f:
                names.update({k: v for k, v in json.load(f).items() if k in names and isinstance(v, str)})
        ids = [tok.convert_tokens_to_ids(t) for t in names.values()]
        missing = [t for t, i in zip(names.values(), ids) if i is None or i == tok.unk_token_id]
        if missing:
            raise CompositionError(f"{path}: modality {m!r} ({cfg.modalities[m].family}) lays its images out "
                                   f"with {', '.join(names.values())}, but the composite's tokenizer lacks "
                                   f"{', '.join(missing)}; recompose from a source whose tokenizer has them")
        out[m] = tuple(ids)
    return out


def _embedding_param_name(llm: nn.Module) -> str:
    emb = llm.get_input_embeddings()
    return next(f"{n}.weight" for n, m in llm.named_modules() if m is emb)


def _read_affixes(file: str, dtype: torch.dtype, device, hidden: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        t = load_file(file)
    except Exception as exc:
        raise CompositionError(f"{file}: unreadable ({type(exc).__name__}: {exc}); the composite is damaged, "
                               f"compose it again or re-download it") from None
    unknown = sorted(set(t) - {"prefix", "suffix"})
    if unknown or not t:
        raise CompositionError(f"{file}: holds {unknown or 'no tensors'}; expected 'prefix' and/or 'suffix'")
    for k, v in t.items():
        if v.ndim != 2 or v.shape[1] != hidden:
            raise CompositionError(f"{file}: tensor {k!r} has shape {tuple(v.shape)}; expected [n, {hidden}] "
                                   f"(the merged LLM's hidden size)")
        check_finite(v, file, k)
    return tuple(t[k].to(device, dtype or t[k].dtype) if k in t else None for k in ("prefix", "suffix"))
