"""A plain causal LM (`*ForCausalLM`, `*LMHeadModel`) as the base: all of it is LLM."""

from mergekit_multimodal.families.base import CAUSAL_LM_PREFIXES, Family

FAMILY = Family(name="causal_lm", architectures=(), llm_prefixes=CAUSAL_LM_PREFIXES, text_only=True)
