"""Check a composite (or a plain merged model) directory before it is pushed.

`validate_for_push`: every file the loader will read is there and opens (JSON configs, shard
indexes against their shards, every safetensors header, MMER's routes, the model card), checked
locally BEFORE the first request, so a half-written composite never lands on the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from safetensors import safe_open

from mergekit_multimodal.format.files import COMPOSITE_CONFIG, MODALITIES_DIR, ROUTES_DIR, read_json
from mergekit_multimodal.errors import CompositionError


def list_upload_files(path: str) -> List[str]:
    """Files under `path` (relative, '/'-separated, sorted) that upload_folder will send: all but
    what it leaves out anyway, filtered as it filters (its DEFAULT_IGNORE_PATTERNS: .git/ and .cache/huggingface/)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    out = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            out.append(os.path.relpath(os.path.join(dirpath, n), path).replace(os.sep, "/"))
    return sorted(filter_repo_objects(out, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _keys(shard: Path) -> set:
    """The tensor names in a safetensors file; safe_open checks the header against the file size."""
    try:
        with safe_open(str(shard), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, not safetensors: all the same to the user
        raise CompositionError(f"{shard}: not a readable safetensors file ({exc})") from None


def _check_index(index: Path) -> None:
    """Every shard an index names exists and holds the tensors the index says it holds."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CompositionError(f"{index}: no weight_map")
    by_shard: dict = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(by_shard.items()):
        file = index.parent / shard
        if not file.is_file():
            raise CompositionError(f"{index}: names shard {shard}, which is missing ({file})")
        if shard.endswith(".safetensors"):
            missing = [t for t in tensors if t not in _keys(file)]
            if missing:
                raise CompositionError(f"{index}: says {file} holds {missing[0]!r} (and {len(missing) - 1} more); it does not")


def _check_weights(directory: Path, basename: str, what: str) -> None:
    """`<basename>.safetensors` or its index (plain merges may also write pytorch_model*.bin)."""
    names = [f"{basename}.safetensors", f"{basename}.safetensors.index.json"]
    if basename == "model":
        names += ["pytorch_model.bin", "pytorch_model.bin.index.json"]
    if not any((directory / n).is_file() for n in names):
        raise CompositionError(f"{directory}: {what} has no weights ({' or '.join(names[:2])})")


def _check_model_dir(directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise CompositionError(f"{directory}: {what} is missing")
    read_json(directory / "config.json")
    _check_weights(directory, "model", what)


def _check_composite(root: Path, cfg_path: Path) -> None:
    """Through the typed manifest (format version, fields) and the method's own list of route streams."""
    from mergekit_multimodal.format.manifest import Manifest
    from mergekit_multimodal.methods import get_method

    manifest = Manifest.read(str(root))
    llm_dir = root / manifest.llm.path
    _check_model_dir(llm_dir, "the merged LLM")
    for name, info in manifest.modalities.items():
        _check_model_dir(root / info.path, f"modality {name!r} (named in {COMPOSITE_CONFIG})")
    method = get_method(manifest.merge_method)
    route_streams = method.route_basenames(manifest) if manifest.routes else []
    if manifest.routes:
        rdir = root / manifest.routes.dir
        kind = manifest.routes.kind
        if not rdir.is_dir():
            raise CompositionError(f"{rdir}: {kind.upper()} routes named in {COMPOSITE_CONFIG} are missing")
        for basename in route_streams:
            _check_weights(rdir, basename, f"the {kind.upper()} routes ({basename})")
    llm_shapes = _check_llm_tensors(llm_dir)
    if manifest.routes:
        method.check_routes(str(root), manifest, llm_shapes)
        for basename in route_streams:
            _check_finite(root / manifest.routes.dir, basename)
    _check_finite(llm_dir, "model")
    for name, info in manifest.modalities.items():
        _check_encoder(name, info.family, root / info.path)
    for name, info in manifest.modalities.items():
        if info.prefix_suffix:
            _check_affixes(root / info.prefix_suffix, llm_shapes)


def _check_llm_tensors(directory: Path) -> dict:
    """Every tensor the merged LLM's config needs is in its files with its shape and dtype, and
    nothing else: names and shapes from the model built on the meta device (no memory), compared
    with the safetensors headers (no weights read). Returns {tensor: (shape, dtype)} of the files."""
    import torch
    import transformers

    from mergekit_multimodal.families import causal_lm_class
    from mergekit_multimodal.format.tensors import header_shapes, weights_file

    found = header_shapes(str(directory), "model")
    file = weights_file(str(directory), "model")
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(directory))
        cls = causal_lm_class(cfg) or transformers.AutoModelForCausalLM  # Auto's error names an unknown one
        with torch.device("meta"):
            model = cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls(cfg)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, bad values
        raise CompositionError(f"{directory / 'config.json'}: the merged LLM cannot be built from it "
                               f"({type(exc).__name__}: {exc})") from None
    params = dict(model.named_parameters())  # tied weights once, under their first name
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    state = model.state_dict()
    want = {n: t for n, t in state.items() if n not in aliases}  # parameters and persistent buffers
    optional = aliases & set(state)  # a tied head's alias: may be stored or not
    missing = sorted(set(want) - set(found))
    if missing:
        raise CompositionError(f"{file}: tensor {missing[0]!r} is missing (and {len(missing) - 1} more); "
                               f"the merged LLM's config needs it")
    unexpected = sorted(set(found) - set(want) - optional)
    if unexpected:
        raise CompositionError(f"{file}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more): "
                               f"not in the merged LLM's config")
    declared = getattr(cfg, "dtype", None)
    declared = getattr(torch, declared, None) if isinstance(declared, str) else declared
    dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(declared)
    for name, (shape, dt) in found.items():
        t = state[name]
        if tuple(shape) != tuple(t.shape):
            raise CompositionError(f"{file}: tensor {name!r} has shape {list(shape)}; the config needs {list(t.shape)}")
        if dtype and dt != dtype and name in params:
            raise CompositionError(f"{file}: tensor {name!r} is {dt}; the config says {dtype}")
    return found


def _check_finite(directory: Path, basename: str) -> None:
    """No NaN or inf in a stream's floating-point tensors, read one tensor at a time."""
    from mergekit_multimodal.format.tensors import check_finite, iter_tensors

    for file, name, tensor in iter_tensors(str(directory), basename):
        check_finite(tensor, file, name)


def _check_encoder(name: str, family: str, directory: Path) -> None:
    """The loader's own strict encoder load (on CPU, then dropped): every encoder/connector tensor
    there with its shape, none unexpected. Encoders are small next to the LLM."""
    from transformers.utils import logging as hf_logging

    from mergekit_multimodal.runtime.encoders import ModalityEncoder

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check, not a load the user asked for
    try:
        ModalityEncoder(name, family, str(directory), None, "cpu")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _check_affixes(file: Path, llm_shapes: dict) -> None:
    from mergekit_multimodal.runtime.model import _read_affixes

    embed = next((s for n, (s, _) in llm_shapes.items() if n.endswith("embed_tokens.weight")), None)
    if not file.is_file():
        raise CompositionError(f"{file}: missing (named in {COMPOSITE_CONFIG})")
    if embed is not None:
        _read_affixes(str(file), None, "cpu", embed[1])


def _check_card(readme: Path) -> None:
    from huggingface_hub import ModelCard

    if not readme.is_file():
        raise CompositionError(f"{readme}: no model card (it is written unless --no-write-model-card)")
    try:
        ModelCard.load(readme)
    except Exception as exc:  # noqa: BLE001 - bad front matter
        raise CompositionError(f"{readme}: not a valid model card ({exc})") from None


def validate_for_push(path: str) -> List[str]:
    """Check a composite (or plain merged model) directory is complete; return the files to upload.

    A composite is a directory with composite_config.json; without it, the directory must be a
    plain model (config.json + weights) and must not hold composite parts. Raises CompositionError
    naming the first bad file.
    """
    root = Path(path)
    if not root.is_dir():
        raise CompositionError(f"{path}: no such directory")
    cfg_path = root / COMPOSITE_CONFIG
    if cfg_path.exists():
        _check_composite(root, cfg_path)
    else:
        for d in (MODALITIES_DIR, ROUTES_DIR):
            if (root / d).exists():
                raise CompositionError(f"{cfg_path}: missing, though {d}/ is there: an incomplete composite")
        _check_model_dir(root, "the merged model")
    files = list_upload_files(path)
    for rel in files:
        if rel.endswith(".safetensors.index.json"):
            _check_index(root / rel)
    for rel in files:
        if rel.endswith(".safetensors"):
            _keys(root / rel)
    _check_card(root / "README.md")
    return files
