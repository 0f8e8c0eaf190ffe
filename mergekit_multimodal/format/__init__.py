"""The composite on disk: file names (`files`), the typed manifest (`manifest`), reading its
safetensors streams (`tensors`). docs/format.md is the reference."""
