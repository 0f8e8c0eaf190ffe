"""`mergekit-mm-run`: ask a composite one question about some media files, print the answer."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import click
import torch
from mergekit.common import dtype_from_name

from mergekit_multimodal.errors import CompositionError, cli_errors

#: --dtype choices; mergekit's dtype_from_name makes the torch dtype
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _media_option(values: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected MODALITY=PATH", param_hint="--media")
        out.append((name, path))
    return out


def answer(composite: str, prompt: str, media: Sequence[Tuple[str, str]] = (), *, kinds: Sequence[Tuple[str, str]] = (),
           device: Optional[str] = None, dtype: Optional[str] = None, max_new_tokens: int = 64,
           route: Optional[str] = "auto", num_frames: Optional[int] = None,
           route_cache: Union[None, int, str] = "auto") -> str:
    """Load the composite, build the inputs, generate greedily, decode the new tokens.

    `media` pairs are (modality, path); `kinds` pairs are (image|video|audio, path), resolved to
    the one modality of the composite that takes that kind. When the prompt holds no placeholder
    at all, one per item is put in front of it, in the order the items were given.
    `route`: "auto" (default) runs a prompt whose media are all of one modality wholly on that
    modality's route when the composite is MMER (exactly that source; the zoo measured 99.7%
    own-task retention this way against 96.0% per token, docs/zoo.md), anything else per token;
    None or "per-token": per-token routing; a modality name: the whole input on that route.
    `route_cache`: CompositeModel.from_pretrained's (a generated token reuses its route's weights).
    """
    from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor, resolve_route
    from mergekit_multimodal.runtime.model import resolve_device

    device = str(resolve_device(device))
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as surrogate escapes
        raise CompositionError("the prompt is not valid UTF-8 text") from None
    if not prompt.strip() and not media and not kinds:
        raise CompositionError("the prompt is empty: give a question (or media to ask about)")
    torch_dtype = dtype_from_name(dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    proc = CompositeProcessor.from_pretrained(composite, num_frames=num_frames)
    items: List[Tuple[str, str]] = [(proc.modality_of_kind(k), p) for k, p in kinds] + list(media)
    by_modality: Dict[str, List[str]] = {}
    for m, p in items:
        by_modality.setdefault(m, []).append(p)
    # markers count as placeholders (`<image_med>`), and a prepended one is a marker, so a family
    # that wraps its items (Gemma 3's <start_of_image> ...) gets its whole item text
    if items and not any(proc.placeholders[m] in proc.expand_markers(prompt) for m in proc.modalities):
        prompt = " ".join(f"<{m}>" for m, _ in items if m in proc.placeholders) + " " + prompt
    inputs = proc(prompt, media=by_modality)  # checks files and placeholders before the model loads
    model = CompositeModel.from_pretrained(composite, torch_dtype=torch_dtype, device=device, route_cache=route_cache)
    with model.route(resolve_route(route, model.manifest, by_modality)):
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return proc.decode(new[0], skip_special_tokens=True).strip()


@click.command("mergekit-mm-run")
@click.argument("composite", type=click.Path(file_okay=False))
@click.argument("prompt")
@click.option("--image", "images", multiple=True, metavar="PATH", help="An image (PNG, JPG...). Repeatable.")
@click.option("--video", "videos", multiple=True, metavar="PATH",
              help="A video: .npy frames (F,H,W,3), GIF, a folder of frames, or mp4/webm (needs `pip install av`).")
@click.option("--audio", "audios", multiple=True, metavar="PATH", help="A WAV (PCM) or .npy waveform. Repeatable.")
@click.option("--media", "media", multiple=True, metavar="MODALITY=PATH",
              help="A file for a modality by its name in the composite (when several take one kind of media).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_NAMES)), default=None,
              help="Default: bfloat16 on GPU, float32 on CPU.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--route", default="auto", show_default=True, metavar="MODALITY|auto|per-token",
              help="A modality: the whole input on its route (MMER: that source's own parameters). auto: so "
                   "when every item is of one modality, else per-token. per-token: each token on its own route.")
@click.option("--num-frames", default=None, type=click.IntRange(1), help="Sample each video to this many frames.")
@click.option("--route-cache", default="auto", show_default=True, metavar="auto|all|0|SIZE",
              help="Memory for built route weights kept between forwards (e.g. 8GiB). auto: on CUDA what fits "
                   "with headroom, on CPU none (each route's weights are rebuilt per forward).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: MERGEKIT_MM_DEBUG=1)")
def main(composite, prompt, images, videos, audios, media, device, dtype, max_new_tokens, route, num_frames,
         route_cache, debug):
    """Answer PROMPT about the given media with the composite at COMPOSITE.

    \b
    mergekit-mm-run ./my-composite --image cat.png --audio meow.wav "What do these have in common?"
    mergekit-mm-run ./my-composite --media video_next=clip.mp4 "<video_next> What happens?"
    """
    kinds = [("image", p) for p in images] + [("video", p) for p in videos] + [("audio", p) for p in audios]
    with cli_errors(exit_code=1, debug=debug):
        text = answer(composite, prompt, _media_option(media), kinds=kinds, device=device, dtype=dtype,
                      max_new_tokens=max_new_tokens, route=route, num_frames=num_frames, route_cache=route_cache)
    click.echo(text)


if __name__ == "__main__":
    main()
