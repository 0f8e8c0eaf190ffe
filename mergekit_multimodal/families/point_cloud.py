"""Point-cloud LLaVA of ours (`PointLlavaForConditionalGeneration`, docs/zoo.md): PointNet-style
encoder + MLP connector, LLM in LLaVA's legacy layout."""

from mergekit_multimodal.families.base import Family
from mergekit_multimodal.runtime import point_cloud as _runtime  # noqa: F401  registers the config with AutoConfig

FAMILY = Family(
    name="point_cloud",
    architectures=("PointLlavaForConditionalGeneration",),
    placeholder_keys=("point_token_index",),
    encoder_prefixes=("point_encoder.",),
    connector_prefixes=("multi_modal_projector.",),
)
