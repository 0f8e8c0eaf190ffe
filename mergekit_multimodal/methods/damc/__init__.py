"""DAMC, whole: its merge (kernel.py), its sources' readers (sources.py: the PEFT two-adapter form
and what both forms share; modelcompose.py: ModelCompose releases and their projector), what it writes and how that is read back (outputs.py), its runtime deltas
(runtime.py) and the training helper for decoupled sources (train.py), bound here."""

from __future__ import annotations

from mergekit_multimodal.compose.vocab import EMBED, HEAD
from mergekit_multimodal.errors import CompositionError
from mergekit_multimodal.families import CONNECTOR, ENCODER, LLM
from mergekit_multimodal.methods.damc import outputs
from mergekit_multimodal.methods.damc.kernel import DAMCKernel, lambdas_of, text_route
from mergekit_multimodal.methods.damc.runtime import DenseDelta, LowRankDelta
from mergekit_multimodal.methods.damc.modelcompose import is_modelcompose, projector_overrides
from mergekit_multimodal.methods.damc.sources import connector_overrides, read_decoupled


class DAMC(DAMCKernel):
    route_kind = "damc"
    #: the sources' LLMs are W0 (checked against the base by the plan); the deltas come from adapters
    reads_sources = False

    def check_config(self, config) -> None:
        for i, m in enumerate(config.models):
            if m.model.lora is None and is_modelcompose(m.model.model.path):
                raise CompositionError(
                    f"models[{i}] ({m.modality}): {m.model.model.path} is a ModelCompose release, which holds no "
                    "encoder; set `model:` to an MLLM checkpoint with that encoder (e.g. a LLaVA checkpoint) and "
                    "`adapters:` to the ModelCompose directory")

    def plan_sources(self, plan) -> None:
        """Read every source's adapters and check each delta against the base tensor it modifies."""
        base = plan.base
        decoupled, overrides = [], []
        for src, m, entry in zip(plan.sources, plan.modalities, plan.config.models):
            where = f"{src.label} adapters {entry.adapters}"

            def name_map(name: str, src=src, where=where) -> str:
                part, mapped = src.layout.classify(name)
                if part != LLM:
                    mapped = name  # already a causal-LM name (ModelCompose, a plain LM trained alone)
                if mapped not in base.llm:
                    raise CompositionError(f"{where}: adapter module {name!r} is not a linear layer of the base's LLM")
                if mapped in (EMBED, HEAD):
                    raise CompositionError(f"{where}: adapters on {mapped!r} are not supported (vocabulary rows)")
                return mapped

            dec = read_decoupled(entry.adapters, m, name_map, entry.adapter_name)
            for kind, deltas in (("text", dec.text), (dec.adapter, dec.modality)):
                for name, lr in deltas.items():
                    if tuple(lr.shape) != tuple(base.llm_shape(name)):
                        raise CompositionError(f"{where}: {kind} adapter on {name!r} gives a delta of shape "
                                               f"{list(lr.shape)}, the base tensor has {list(base.llm_shape(name))}")
            hidden = base.llm_shape(EMBED)[-1]
            for kind, t in (("prefix", dec.prefix), ("suffix", dec.suffix)):
                if t is not None and t.shape[-1] != hidden:
                    raise CompositionError(f"{where}: {kind}_tokens.{dec.adapter} has width {t.shape[-1]}, "
                                           f"the LLM's hidden size is {hidden}")
            if dec.form == "modelcompose" and not src.parts.get(ENCODER):
                raise CompositionError(
                    f"{src.label}: {src.path} holds no encoder; a ModelCompose release does not ship one "
                    f"(its config names {dec.encoders or 'none'}). Set `model:` to an MLLM checkpoint with that "
                    "encoder and `adapters:` to the ModelCompose directory")
            decoupled.append(dec)
            names = [n for ns in src.parts.values() for n in ns]
            overrides.append({**projector_overrides(dec, src.layout.family, names, src.shapes, where),
                              **connector_overrides(dec, src.parts.get(CONNECTOR, []), src.shapes, where)})
        plan.method_state, plan.connector_overrides = decoupled, overrides

    def tensor_merger(self, plan, job, params, state):
        return outputs.DAMCTensorMerger(self, plan, job, params, state)

    def route_files(self, plan):
        return outputs.route_files(plan)

    def write_modality(self, plan, i, directory):
        outputs.write_modality(plan, i, directory)

    def manifest_modality(self, plan, i):
        return outputs.manifest_modality(plan, i)

    def manifest_routes(self, plan):
        return outputs.manifest_routes(plan)

    def route_basenames(self, manifest):
        return [outputs.routes_of(manifest).damc]

    def check_routes(self, path, manifest, llm_shapes):
        return outputs.check_routes(path, manifest, llm_shapes)

    def read_deltas(self, path, manifest, modalities, dtype, skip=(), only=None):
        return outputs.read_deltas(path, manifest, modalities, dtype, skip, only)


METHOD = DAMC()

__all__ = ["METHOD", "DAMC", "DenseDelta", "LowRankDelta", "lambdas_of", "text_route"]
