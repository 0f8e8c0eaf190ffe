"""Push a composite (or a plain merge) to the Hugging Face Hub, refusing an incomplete one first.

The upload itself is huggingface_hub's: `create_repo`, `create_branch`, `upload_folder` (LFS or
Xet, its own progress bars, its own token lookup: `--token`, else HF_TOKEN, else the cached login).
What this package adds is what a multi-GB directory needs before and around that:

- `validate.py`: `validate_for_push`, every file the loader will read is there and opens (JSON
  configs, shard indexes against their shards, every safetensors header, MMER's routes, the model
  card), checked locally BEFORE the first request, so a half-written composite never lands on the Hub;
- `upload.py`: `push`, and retries of each step on transient failures (connection errors, HTTP
  408/429/5xx), with exponential backoff: huggingface_hub retries single requests such as preupload
  and LFS parts, but not the commit call, and one 503 there would otherwise lose the whole push.
"""

from mergekit_multimodal.hub.upload import RETRY_ATTEMPTS, is_transient, push, with_retries
from mergekit_multimodal.hub.validate import list_upload_files, validate_for_push

__all__ = ["RETRY_ATTEMPTS", "is_transient", "list_upload_files", "push", "validate_for_push", "with_retries"]
