"""Composing: the YAML (config), the plan and its checks (plan, checkpoint, vocab), the streaming
engine and its shard writer (engine, writer), and the model card (card). docs/architecture.md."""
