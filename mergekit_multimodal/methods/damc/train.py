"""Fine-tune an LLM with decoupled parameters (DAMC sources), and save them in the documented form.

Every targeted linear layer gets two LoRA adapters, `text` and `<modality>`; a token-type mask
sends the modality tokens (learned prefix + projected features + learned suffix) through the
modality adapter and every other token through the text adapter, while attention runs jointly
over all tokens. Tokens generated later take the text path (the composite's loader does so).
A plain torch loop: readable, CPU-fast on tiny models, no Trainer needed.

Typical use (a tiny LLaVA of the model zoo)::

    llm = AutoModelForCausalLM.from_pretrained(base_dir)            # W0, the shared base
    batches = [{"prompt_ids": ids1, "features": feats, "target_ids": ids2}, ...]
    trained = train_decoupled(llm, batches, modality="image", rank=8, steps=20)
    save_decoupled(trained, "damc-image")   # then YAML: adapters: damc-image (docs/damc.md)

`features` are the frozen encoder + connector's outputs ([n_features, hidden], e.g. LLaVA's
`model.get_image_features(...)`). To train the connector too (as ModelCompose does), pass it as
`connector=` and give each batch the encoder's outputs as `encoder_features` instead;
`save_decoupled` then also writes `connector.safetensors`, which replaces the paired model's
connector in the composite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from mergekit_multimodal.methods.damc.sources import CONNECTOR_FILE, PREFIX_SUFFIX_FILE, TEXT_ADAPTER

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Mask:
    """Shared token-type mask: True where a token is a modality token (set per forward)."""

    value: torch.Tensor = None


class DecoupledLoRALinear(nn.Module):
    """y = W0 x + s * B_t A_t x on text tokens, W0 x + s * B_m A_m x on modality tokens."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, mask: _Mask):
        super().__init__()
        self.linear, self.scale, self.mask = linear, scale, mask
        f_in, f_out = linear.in_features, linear.out_features
        # PEFT's init: A random (kaiming-uniform), B zero, so training starts exactly at W0
        self.A = nn.ParameterList([nn.Parameter(torch.empty(rank, f_in)) for _ in range(2)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(f_out, rank)) for _ in range(2)])
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)

    def forward(self, x):
        y = self.linear(x)
        t = (x @ self.A[0].T) @ self.B[0].T
        m = (x @ self.A[1].T) @ self.B[1].T
        mask = self.mask.value
        if mask is None or mask.shape != x.shape[:-1]:  # decoding: text path
            return y + self.scale * t
        return y + self.scale * torch.where(mask.unsqueeze(-1), m, t)


@dataclass
class DecoupledModel:
    llm: nn.Module
    modality: str
    rank: int
    alpha: float
    prefix: nn.Parameter
    suffix: nn.Parameter
    layers: Dict[str, DecoupledLoRALinear] = field(default_factory=dict)  # module name -> wrapper
    losses: List[float] = field(default_factory=list)
    connector: Optional[nn.Module] = None  # trained with the adapters, when given
    connector_name: str = "multi_modal_projector"  # its module name in the paired MLLM


def _wrap(llm: nn.Module, targets: Sequence[str], rank: int, scale: float, mask: _Mask) -> Dict[str, DecoupledLoRALinear]:
    from mergekit_multimodal.runtime.routing import replace_modules

    def wrap(full: str, child: nn.Module):
        if isinstance(child, nn.Linear) and full.rsplit(".", 1)[-1] in targets:
            return DecoupledLoRALinear(child, rank, scale, mask)
        return None

    layers = replace_modules(llm, wrap)
    if not layers:
        raise ValueError(f"no linear layer named one of {list(targets)} in the model")
    return layers


def _collate(seqs):
    """Sequences from `_sequence`, right-padded into one batch (padding: no loss, not attended, text
    type); a single sequence passes through unpadded, with no attention mask."""
    if len(seqs) == 1:
        return (*seqs[0], None)
    width = max(e.shape[1] for e, _, _ in seqs)
    embeds = seqs[0][0].new_zeros(len(seqs), width, seqs[0][0].shape[-1])
    device = embeds.device
    mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=device)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long, device=device)
    attention = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, (e, m, lab) in enumerate(seqs):
        n = e.shape[1]
        embeds[i, :n], mask[i, :n], labels[i, :n], attention[i, :n] = e[0], m[0], lab[0], 1
    return embeds, mask, labels, attention


def _sequence(llm, prefix, suffix, batch: Mapping[str, torch.Tensor]):
    emb = llm.get_input_embeddings()
    prompt, target = batch["prompt_ids"].reshape(-1), batch["target_ids"].reshape(-1)
    feats = batch["features"].reshape(-1, prefix.shape[-1]).to(prefix.dtype)
    after = batch.get("after_ids")  # optional text between the item and the target, no loss
    after = emb(after.reshape(-1)) if after is not None else feats[:0]
    parts = [emb(prompt), prefix, feats, suffix, after, emb(target)]
    n_mod = prefix.shape[0] + feats.shape[0] + suffix.shape[0]
    device = prefix.device
    mask = torch.zeros(sum(p.shape[0] for p in parts), dtype=torch.bool, device=device)
    mask[len(prompt):len(prompt) + n_mod] = True
    labels = torch.full((mask.shape[0],), -100, dtype=torch.long, device=device)
    labels[-len(target):] = target
    return torch.cat(parts).unsqueeze(0), mask.unsqueeze(0), labels.unsqueeze(0)


def train_decoupled(llm: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, modality: str,
                    rank: int = 8, alpha: float = 16.0, steps: int = 20, lr: float = 1e-3,
                    n_prefix: int = 5, n_suffix: int = 5, target_modules: Sequence[str] = DEFAULT_TARGETS,
                    seed: int = 0, batch_size: int = 1, connector: Optional[nn.Module] = None,
                    connector_name: str = "multi_modal_projector",
                    progress: Union[bool, Callable[[int], None]] = False) -> DecoupledModel:
    """Train text + modality LoRA adapters and prefix/suffix embeddings on a frozen causal LM (W0).

    llm: a transformers causal LM holding the shared base weights (modified in place: its targeted
        linears are wrapped). batches: dicts of `prompt_ids` [T1] (text before the item),
        `features` [F, hidden] (the item's projected features), optionally `after_ids` (text after
        the item that is not a target, e.g. the question) and `target_ids` [T2] (the loss target),
        one sequence each; cycled for `steps` optimizer steps (Adam), `batch_size` sequences a step
        (right-padded; the loss is the mean over all their target tokens).
    connector: the paired MLLM's connector module, trained too (updated in place); batches then
        give `encoder_features` (what the connector's forward takes, e.g. [F, encoder width] for
        LLaVA) in place of `features`, and `connector_kwargs` if its forward needs more (Mistral3:
        `{"image_sizes": ...}`). `connector_name` is its module name in the MLLM
        (`multi_modal_projector` in LLaVA, Qwen2-Audio, Mistral3, Voxtral).
    progress: True shows a progress bar with the loss; a callable is called with 1 after each step.
    Returns a `DecoupledModel` for `save_decoupled`. Loss values are in `.losses`.
    """
    torch.manual_seed(seed)
    batches = list(batches)
    if not batches:
        raise ValueError("train_decoupled needs at least one batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for p in llm.parameters():
        p.requires_grad_(False)
    mask = _Mask()
    layers = _wrap(llm, target_modules, rank, alpha / rank, mask)
    hidden = llm.get_input_embeddings().weight.shape[-1]
    dtype = llm.get_input_embeddings().weight.dtype
    prefix = nn.Parameter(0.02 * torch.randn(n_prefix, hidden, dtype=dtype))
    suffix = nn.Parameter(0.02 * torch.randn(n_suffix, hidden, dtype=dtype))
    params = [prefix, suffix] + [p for wrap in layers.values() for p in (*wrap.A, *wrap.B)]
    if connector is not None:
        missing = [i for i, b in enumerate(batches) if "encoder_features" not in b]
        if missing:
            raise ValueError(f"with connector=, every batch needs `encoder_features` (batch {missing[0]} has none)")
        for p in connector.parameters():
            p.requires_grad_(True)
        params += list(connector.parameters())
        connector.train()
    opt = torch.optim.Adam(params, lr=lr)
    out = DecoupledModel(llm, modality, rank, alpha, prefix, suffix, layers, connector=connector,
                         connector_name=connector_name)
    llm.train()

    def item(batch):
        if connector is None:
            return batch
        enc = batch["encoder_features"].to(next(connector.parameters()).dtype)
        feats = connector(enc, **batch.get("connector_kwargs", {}))  # e.g. Mistral3's image_sizes
        return {**batch, "features": feats.reshape(-1, feats.shape[-1])}

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train_decoupled ({modality})", unit="step")
    for step in range(steps):
        seqs = [_sequence(llm, prefix, suffix, item(batches[(step * batch_size + j) % len(batches)]))
                for j in range(batch_size)]
        embeds, mask.value, labels, attention = _collate(seqs)
        loss = llm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.losses.append(loss.detach().item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out.losses[-1]:.4f}", refresh=False)
        elif callable(progress):
            progress(1)
    if bar is not None:
        bar.close()
    mask.value = None
    llm.eval()
    if connector is not None:
        connector.eval()
    return out


def save_decoupled(trained: DecoupledModel, out_dir: str) -> str:
    """Write the PEFT two-adapter form read by `merge_method: damc` (docs/damc.md):
    `out_dir/text/`, `out_dir/<modality>/` (adapter_config.json + adapter_model.safetensors) and
    `out_dir/prefix_suffix.safetensors`; with a trained connector, `out_dir/connector.safetensors`
    (`<connector_name>.<param>`: the paired model's own names)."""
    from peft import LoraConfig

    targets = sorted({name.rsplit(".", 1)[-1] for name in trained.layers})
    for i, adapter in enumerate((TEXT_ADAPTER, trained.modality)):
        d = os.path.join(out_dir, adapter)
        os.makedirs(d, exist_ok=True)
        LoraConfig(r=trained.rank, lora_alpha=trained.alpha, target_modules=targets).save_pretrained(d)
        tensors = {}
        for name, wrap in trained.layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = wrap.A[i].detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = wrap.B[i].detach().contiguous()
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    save_file({f"prefix_tokens.{trained.modality}": trained.prefix.detach().contiguous(),
               f"suffix_tokens.{trained.modality}": trained.suffix.detach().contiguous()},
              os.path.join(out_dir, PREFIX_SUFFIX_FILE))
    if trained.connector is not None:
        save_file({f"{trained.connector_name}.{k}": v.detach().contiguous()
                   for k, v in trained.connector.state_dict().items()}, os.path.join(out_dir, CONNECTOR_FILE))
    return out_dir
