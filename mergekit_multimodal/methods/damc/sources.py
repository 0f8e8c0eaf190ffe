"""Readers of DAMC sources: MLLMs trained with decoupled text / modality parameters (docs/damc.md).

A decoupled source gives, for some LLM linear layers, a *text* delta and a *modality* delta
(LoRA factors), plus the learned prefix/suffix embeddings placed around modality tokens. Two
on-disk forms are read, both into one `DecoupledSource`:

* **PEFT, two named adapters** (what `train.save_decoupled` writes and PEFT's
  `save_pretrained` writes for a model holding adapters `text` and `<modality>`):
  `DIR/text/{adapter_config.json,adapter_model.safetensors}`,
  `DIR/<modality>/{...}`, and `DIR/prefix_suffix.safetensors` (`prefix_tokens.<m>`, `suffix_tokens.<m>`).
  An adapter named `default` at DIR itself is taken as the text adapter. Optionally
  `DIR/connector.safetensors`: a connector trained with the adapters, in the paired model's own
  tensor names (`multi_modal_projector.linear_1.weight` ...), which replaces that model's connector.
* **ModelCompose release** (Chen et al., 2024; read by modelcompose.py): `DIR/adapter_model.bin`, a torch pickle with
  `model.layers.{i}.<module>.lora_A.default.weight` (text), `...lora_A.<modality>.weight`,
  `model.modal_projectors.<modality>.*`, `prefix_tokens.<modality>`, `suffix_tokens.<modality>`;
  `DIR/config.json` names the encoders (`mm_vision_encoder`, ...), which are not in the release,
  and its `lora_strategy` (`modal+language`, `modal`, `same`); optional `non_lora_trainables.bin`.
  Composed ModelCompose checkpoints (several modalities already merged) are refused.

Pickles are only opened with `torch.load(weights_only=True)` and must hold tensors only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

from mergekit_multimodal.errors import CompositionError

PREFIX_SUFFIX_FILE = "prefix_suffix.safetensors"
CONNECTOR_FILE = "connector.safetensors"
TEXT_ADAPTER = "text"
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LowRank:
    """delta = scale * B @ A, A: [r, in], B: [out, r] (PEFT's lora_A / lora_B weights)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scale * (self.B[rows].to(dtype) @ self.A.to(dtype))


@dataclass
class Dense:
    """A dense delta [out, in] (a source trained with full decoupled weights, not LoRA)."""

    delta: torch.Tensor
    rank = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.delta.shape)

    def dense(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta[rows].to(dtype)


Delta = Union[LowRank, Dense]
DENSE_FILE = "delta.safetensors"


@dataclass
class DecoupledSource:
    """One DAMC source: deltas by causal-LM tensor name (`model.layers.0.self_attn.q_proj.weight`)."""

    path: str
    form: str  # "peft" | "modelcompose"
    adapter: str  # the modality adapter's name inside the checkpoint
    text: Dict[str, "Delta"] = field(default_factory=dict)
    modality: Dict[str, "Delta"] = field(default_factory=dict)
    prefix: Optional[torch.Tensor] = None  # [n_prefix, hidden]
    suffix: Optional[torch.Tensor] = None
    projector: Dict[str, torch.Tensor] = field(default_factory=dict)  # ModelCompose: modal_projectors.<m>.*
    connector: Dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT form: connector.safetensors
    projector_type: Optional[str] = None  # ModelCompose config: mm_<m>_projector_type / mm_projector_type
    encoders: Dict[str, str] = field(default_factory=dict)  # ModelCompose config.json: mm_*_encoder


def check_finite(tensors: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """Every floating tensor of a file finite, or an error naming the file and the tensor."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompositionError(f"{path}: tensor {key!r} holds NaN or inf values")
    return tensors


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors (safetensors' reader), checked finite; damage is an error naming it."""
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise CompositionError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    return check_finite(tensors, path)


def safe_torch_load(path: str) -> Dict[str, torch.Tensor]:
    """A pickled state dict, refusing anything but a flat dict of tensors (never arbitrary objects)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompositionError(
            f"{path}: refused to unpickle: it holds something other than tensors, or is damaged "
            f"(torch.load(weights_only=True) said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise CompositionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CompositionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; refused")
    return check_finite(obj, path)


def _read_weights(directory: str) -> Dict[str, torch.Tensor]:
    """A PEFT adapter's tensors: peft's own reader for safetensors; for a pickle our tensor-only
    loader (peft's `torch_load` would accept entries that are not tensors)."""
    from peft.utils import load_peft_weights

    st, bin_ = os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "adapter_model.bin")
    if os.path.exists(st):  # checked first: peft would otherwise look the directory up on the Hub
        try:
            weights = load_peft_weights(directory, device="cpu")
        except Exception as exc:
            raise CompositionError(f"{st}: unreadable ({type(exc).__name__}: {exc})") from None
        return check_finite(weights, st)
    if os.path.exists(bin_):
        return safe_torch_load(bin_)
    raise CompositionError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")


def _lora_config(directory: str) -> dict:
    """adapter_config.json read by peft (`LoraConfig.from_pretrained`), as the fields `_scale` reads."""
    from peft import LoraConfig

    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):  # checked first: peft would otherwise look the directory up on the Hub
        raise CompositionError(f"{path}: missing")
    try:
        cfg = LoraConfig.from_pretrained(directory)
    except Exception as exc:
        raise CompositionError(f"{path}: not a LoRA adapter config ({type(exc).__name__}: {exc})") from None
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "alpha_pattern": cfg.alpha_pattern, "use_dora": cfg.use_dora,
            "use_rslora": cfg.use_rslora}


def _scale(cfg: dict, where: str) -> Callable[[int], float]:
    """PEFT's scaling as a function of each module's rank: lora_alpha / r (lora_alpha / sqrt(r) with
    rsLoRA). The rank is read from lora_A's shape, so PEFT's `rank_pattern` is honoured."""
    alpha = cfg.get("lora_alpha")
    if alpha is None or not cfg.get("r", cfg.get("lora_r")):
        raise CompositionError(f"{where}: needs the LoRA rank and alpha (`r`/`lora_r` and `lora_alpha`)")
    if cfg.get("alpha_pattern"):
        raise CompositionError(f"{where}: per-module `alpha_pattern` is not supported; merge it into plain LoRA first")
    if cfg.get("use_dora"):
        raise CompositionError(f"{where}: DoRA adapters are not plain low-rank deltas; DAMC reads LoRA only")
    if cfg.get("use_rslora"):
        return lambda r: float(alpha) / float(r) ** 0.5
    return lambda r: float(alpha) / float(r)


def _pair(factors: Dict[str, Dict[str, torch.Tensor]], scale: Callable[[int], float], where: str,
          name_map: Callable[[str], str]) -> Dict[str, LowRank]:
    out = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise CompositionError(f"{where}: {module}: lora_A and lora_B must both be present")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CompositionError(f"{where}: {module}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not pair")
        out[name_map(module + ".weight")] = LowRank(A, B, scale(A.shape[0]))
    return out


def _split_lora(weights: Dict[str, torch.Tensor], where: str):
    """{adapter or None: {module: {"A"|"B": tensor}}} and the non-LoRA rest."""
    by_adapter: Dict[Optional[str], Dict[str, Dict[str, torch.Tensor]]] = {}
    rest = {}
    for key, t in weights.items():
        m = _LORA.match(key)
        if m is None:
            rest[key] = t
            continue
        module = m["module"][len(_PEFT_PREFIX):] if m["module"].startswith(_PEFT_PREFIX) else m["module"]
        by_adapter.setdefault(m["adapter"], {}).setdefault(module, {})[m["ab"]] = t
    return by_adapter, rest


def read_decoupled(directory: str, modality: str, name_map: Callable[[str], str],
                   adapter: Optional[str] = None) -> DecoupledSource:
    """Read a decoupled source in either form; `name_map` turns a checkpoint module name into the
    causal-LM tensor name (from the paired MLLM's layout) and raises CompositionError if it can't."""
    if not os.path.isdir(directory):
        raise CompositionError(f"adapters {directory!r}: not a directory")
    from mergekit_multimodal.methods.damc.modelcompose import is_modelcompose, read_modelcompose

    if is_modelcompose(directory):
        return read_modelcompose(directory, modality, name_map, adapter)
    return _read_peft(directory, modality, name_map, adapter)


def _read_peft(directory: str, modality: str, name_map, adapter: Optional[str]) -> DecoupledSource:
    adapters = {d: os.path.join(directory, d) for d in sorted(os.listdir(directory))
                if any(os.path.exists(os.path.join(directory, d, f)) for f in ("adapter_config.json", DENSE_FILE))}
    if os.path.exists(os.path.join(directory, "adapter_config.json")):
        adapters.setdefault("default", directory)
    text_name = TEXT_ADAPTER if TEXT_ADAPTER in adapters else "default" if "default" in adapters else None
    others = [a for a in adapters if a != text_name]
    if adapter is None:
        adapter = modality if modality in others else (others[0] if len(others) == 1 else None)
    if text_name is None or adapter not in others:
        raise CompositionError(
            f"{directory}: a decoupled PEFT source needs two named adapters, `text` (or `default`) and the "
            f"modality's ({modality!r}, or set `adapter_name:`); found {sorted(adapters) or 'none'}"
        )
    src = DecoupledSource(directory, "peft", adapter)
    for which, name in (("text", text_name), ("modality", adapter)):
        d = adapters[name]
        if os.path.exists(os.path.join(d, DENSE_FILE)):  # dense deltas: <module>.weight -> [out, in]
            setattr(src, which, _read_dense(os.path.join(d, DENSE_FILE), name_map))
            continue
        cfg = _lora_config(d)
        by_adapter, rest = _split_lora(_read_weights(d), d)
        if rest:
            raise CompositionError(f"{d}: non-LoRA tensor {next(iter(rest))!r}: DAMC reads LoRA adapters only "
                                   "(put prefix/suffix tokens in prefix_suffix.safetensors)")
        factors = {}
        for sub in by_adapter.values():
            factors.update(sub)
        setattr(src, which, _pair(factors, _scale(cfg, os.path.join(d, "adapter_config.json")), d, name_map))
    ps = os.path.join(directory, PREFIX_SUFFIX_FILE)
    if os.path.exists(ps):
        tokens = _load_safetensors(ps)
        src.prefix, src.suffix = _tokens(tokens, adapter, modality, ps)
    conn = os.path.join(directory, CONNECTOR_FILE)
    if os.path.exists(conn):
        src.connector = _load_safetensors(conn)
    return src


def _read_dense(path: str, name_map) -> Dict[str, Dense]:
    tensors = _load_safetensors(path)
    out = {}
    for key, t in tensors.items():
        if t.dim() != 2 or not key.endswith(".weight"):
            raise CompositionError(f"{path}: {key!r} must be a 2-D delta of a linear layer's `.weight`")
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        out[name_map(name)] = Dense(t)
    return out


def _tokens(tokens: Dict[str, torch.Tensor], adapter: str, modality: str, where: str):
    out = []
    for kind in ("prefix", "suffix"):
        t = tokens.get(f"{kind}_tokens.{adapter}", tokens.get(f"{kind}_tokens.{modality}"))
        if t is not None:
            if t.dim() not in (2, 3):
                raise CompositionError(f"{where}: {kind}_tokens.{adapter} has shape {list(t.shape)}; expected [n, hidden]")
            t = t.reshape(-1, t.shape[-1])
        out.append(t)
    return out


def connector_overrides(src: DecoupledSource, connector_names, shapes, where: str) -> Dict[str, torch.Tensor]:
    """A PEFT-form source's trained connector onto the paired model's connector tensors. Names
    match with or without the transformers-5 `model.` prefix, so either layout pairs with either."""
    if not src.connector:
        return {}
    by_short = {n.removeprefix("model."): n for n in connector_names}
    out = {}
    for k, t in src.connector.items():
        hit = by_short.get(k.removeprefix("model."))
        if hit is None:
            have = ", ".join(sorted(by_short)) or "none"
            raise CompositionError(f"{where}: {CONNECTOR_FILE} tensor {k!r} is not a connector tensor of the "
                                   f"paired model (its connector tensors: {have})")
        if tuple(shapes[hit][0]) != tuple(t.shape):
            raise CompositionError(f"{where}: {CONNECTOR_FILE} tensor {k!r} has shape {list(t.shape)}, the paired "
                                   f"model's {hit!r} has {list(shapes[hit][0])}")
        out[hit] = t
    return out
