"""Media files -> CompositeProcessor -> CompositeModel, against each source model run by transformers.

The source side is computed independently: the source's own processor config loaded with
transformers' Auto classes on the decoded media, its placeholder repeated once per feature (as its
processor expands it), and the source class's own forward. Covers every family's tiny stand-in
(families/<name>.py), LLaVA-NeXT's anyres tiling included.
"""

import inspect
import wave

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mergekit_multimodal import CompositionError, compose
from mergekit_multimodal.families import tiny_sources
from mergekit_multimodal.runtime import CompositeModel, CompositeProcessor
from mergekit_multimodal.testing import SOURCE_KINDS, build_tiny_family
from tests.helpers import DEVICE, DTYPE, KINDS, MODALITY, assert_like_source, composite_config

V0 = 96
#: every family's tiny stand-in: the kind of media it takes, and its own placeholder token (the
#: config field named after that kind), from the family files
KIND = {k: fam.kind for k, (fam, _) in tiny_sources().items()}
PLACEHOLDER = {k: next(tok for field, tok in t.placeholder_fields.items() if field.startswith(fam.kind))
               for k, (fam, t) in tiny_sources().items()}
#: stand-ins built by a shared fixture; any other (a new family) gets a tiny family of its own
FIXTURE = {**{k: "family" for k in KINDS}, "mistral3": "mistral_family", "voxtral": "mistral_family",
           "llava_next": "next_family", "qwen2_vl": "qwen2_vl_family", "qwen2_vl_video": "qwen2_vl_family",
           "qwen2_5_vl": "qwen25_vl_family", "qwen2_5_vl_ocr": "qwen25_vl_family"}


def write_media(kind, d, seed=0):
    """A media file of the kind, and the decoded array the source side gets."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        arr = rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)  # not square: the processor must resize/crop
        Image.fromarray(arr).save(d / "x.png")
        return d / "x.png", arr
    if kind == "video":
        arr = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
        np.save(d / "x.npy", arr)
        return d / "x.npy", arr
    pcm = (np.sin(np.arange(12000) * 0.07) * 20000 * rng.uniform(0.5, 1)).astype(np.int16)  # 0.75 s at 16 kHz
    with wave.open(str(d / "x.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    return d / "x.wav", pcm.astype(np.float32) / 32768


def source_inputs(path, kind, decoded):
    if kind == "image":
        proc = transformers.AutoImageProcessor.from_pretrained(path)
        cfg = transformers.AutoConfig.from_pretrained(path)
        extra = {}
        if cfg.model_type == "mistral3":  # PixtralProcessor passes patch_size * spatial_merge_size
            side = cfg.vision_config.patch_size * cfg.spatial_merge_size
            extra = {"patch_size": {"height": side, "width": side}}
        out = proc(images=[Image.fromarray(decoded)], return_tensors="pt", **extra)
        return {k: out[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in out}
    if kind == "video":
        proc = transformers.AutoImageProcessor.from_pretrained(path)
        frames = proc(images=[Image.fromarray(f) for f in decoded], return_tensors="pt")["pixel_values"]
        return {"pixel_values_videos": frames[None]}
    fe = transformers.AutoFeatureExtractor.from_pretrained(path)
    out = fe([decoded], sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    if "qwen2" in transformers.AutoConfig.from_pretrained(path).model_type:
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}
    return {"input_features": out["input_features"]}


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_files_through_the_processor_reproduce_the_source(kind, request, tmp_path):
    fam = request.getfixturevalue(FIXTURE[kind]) if kind in FIXTURE else build_tiny_family(tmp_path / "fam", (kind,))
    out = compose(composite_config(fam, "mmer", [kind]), str(tmp_path / "c"))
    modality = MODALITY[kind]
    proc = CompositeProcessor.from_pretrained(out)
    model = CompositeModel.from_pretrained(out, device=DEVICE, torch_dtype=DTYPE)
    file, decoded = write_media(KIND[kind], tmp_path)
    family_spec = tiny_sources()[kind][0]
    # a family that wraps each item in special tokens (Gemma 3) takes the generic marker, which becomes them
    ph = f"<{modality}>" if family_spec.item_text else proc.placeholders[modality]
    inputs = proc(f"w1 w2 {ph} w3 w4", media={modality: [str(file)]})
    with torch.no_grad():
        got = model(**inputs).logits

    src = fam.sources[kind]
    source_cls = getattr(transformers, transformers.AutoConfig.from_pretrained(src).architectures[0])
    if family_spec.prompt_token:  # the family's own processor lays the prompt out (its own token)
        own = transformers.AutoProcessor.from_pretrained(src)
        batch = own(text=f"w1 w2 {family_spec.prompt_token} w3 w4", images=[Image.fromarray(decoded)],
                    return_tensors="pt")

        def source(device, dtype):
            m = source_cls.from_pretrained(src, dtype=dtype).to(device).eval()
            here = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                return m(**here).logits

        assert_like_source(got, source, V0)
        return
    media = source_inputs(src, KIND[kind], decoded)
    if KIND[kind] == "video" and transformers.AutoConfig.from_pretrained(src).model_type in (
            "llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        # their video processors need torchvision: both sides take the composite's frames (whose steps
        # tests/test_llava_onevision.py and tests/test_qwen2_vl.py check against independent computations)
        media = dict(inputs["media"][modality])
    n_features = model.encoders[modality].features(inputs["media"][modality])[0].shape[0]
    expanded = [PLACEHOLDER[kind]] * n_features
    if kind == "mistral3":  # as PixtralProcessor expands it: [IMG_BREAK] after each row, [IMG_END] last
        h, w = (int(v) for v in media["image_sizes"][0])
        src_cfg = transformers.AutoConfig.from_pretrained(src)
        side = src_cfg.vision_config.patch_size * src_cfg.spatial_merge_size
        rows, cols = h // side, w // side
        assert rows * cols == n_features and rows > 1 and cols > 1, (rows, cols, n_features)
        expanded = (["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows
        expanded[-1] = "[IMG_END]"
    tok = transformers.AutoTokenizer.from_pretrained(src)
    item = (family_spec.item_text or "{}").format(" ".join(expanded))  # Qwen2-VL: <|vision_start|> ... <|vision_end|>
    ids = tok("w1 w2 " + item + " w3 w4", return_tensors="pt").input_ids
    if "mm_token_type_ids" in inspect.signature(source_cls.forward).parameters:  # Qwen2-VL's 3-D positions need them
        src_cfg = transformers.AutoConfig.from_pretrained(src)
        media["mm_token_type_ids"] = (ids == src_cfg.image_token_id).long() + 2 * (ids == src_cfg.video_token_id).long()

    def source(device, dtype):
        m = source_cls.from_pretrained(src, dtype=dtype).to(device).eval()
        here = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in media.items()}
        with torch.no_grad():
            return m(input_ids=ids.to(device), **here).logits

    assert_like_source(got, source, V0)


@pytest.fixture(scope="module")
def two_modalities(family, tmp_path_factory):
    return compose(composite_config(family, "mmer", ["llava", "qwen2_audio"]), str(tmp_path_factory.mktemp("c") / "c"))


def test_several_items_and_modalities_in_one_batch(two_modalities, tmp_path):
    proc = CompositeProcessor.from_pretrained(two_modalities)
    model = CompositeModel.from_pretrained(two_modalities)
    img, _ = write_media("image", tmp_path)
    wav, _ = write_media("audio", tmp_path)
    batch = proc(["w1 <image> w2 <|AUDIO|> <image>", "w3 <|AUDIO|>"], images=[img, img], audios=[wav, wav])
    assert batch["media"]["image"]["pixel_values"].shape[0] == 2
    assert batch["attention_mask"].tolist()[1][:2] == [0, 0]  # left-padded
    new = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, 3)
    # Row 2 alone gives the same logits as row 2 in the batch (padding and item order are right).
    alone = proc("w3 <|AUDIO|>", audios=[wav])
    with torch.no_grad():
        batched = model(**batch).logits[1, -1]
        single = model(**alone).logits[0, -1]
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_processor_errors_name_what_to_fix(two_modalities, tmp_path):
    proc = CompositeProcessor.from_pretrained(two_modalities)
    img, _ = write_media("image", tmp_path)
    with pytest.raises(CompositionError, match=r"2 '<image>' placeholder\(s\) but 1 image item"):
        proc("<image> <image>", images=[img])
    with pytest.raises(CompositionError, match="has no modality 'video'"):
        proc("w1", media={"video": [img]})
    with pytest.raises(CompositionError, match="a video given without its modality is ambiguous: none takes videos"):
        proc("w1", videos=[img])
    with pytest.raises(CompositionError, match="image file not found: .*nope.png"):
        proc("<image>", images=[tmp_path / "nope.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CompositionError, match="bad.png: not a readable image"):
        proc("<image>", images=[bad])
    badwav = tmp_path / "bad.wav"
    badwav.write_bytes(b"RIFFxxxx")
    with pytest.raises(CompositionError, match="bad.wav: not a readable WAV"):
        proc("<|AUDIO|>", audios=[badwav])
    with pytest.raises(CompositionError, match="must be a .wav or .npy"):
        proc("<|AUDIO|>", audios=[img])


def test_video_readers_agree(tmp_path):
    from mergekit_multimodal.runtime import media as M

    frames = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", frames)
    Image.fromarray(frames[0]).save(tmp_path / "v.gif", save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]])
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "frames" / f"{i:03d}.png")
    np.testing.assert_array_equal(M.load_video(tmp_path / "v.npy"), frames)
    np.testing.assert_array_equal(M.load_video(tmp_path / "frames"), frames)
    assert M.load_video(tmp_path / "v.gif").shape == frames.shape  # GIF palettes are lossy
    np.testing.assert_array_equal(M.sample_frames(frames, 2), frames[[0, 2]])


def test_mp4_is_read_with_pyav(tmp_path):
    av = pytest.importorskip("av")  # optional dependency (`pip install av`; in the test extra)
    from mergekit_multimodal.runtime import media as M

    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    for i in range(4):
        frames[i, :, i * 8:(i + 1) * 8] = 255  # a white bar moving right
    with av.open(str(tmp_path / "v.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    got = M.load_video(tmp_path / "v.mp4")
    assert got.shape == frames.shape
    assert np.abs(got.astype(int) - frames).mean() < 20  # lossy codec, same picture
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(CompositionError, match="bad.mp4: not a readable video"):
        M.load_video(tmp_path / "bad.mp4")


def test_mistral3_row_tokens_missing_from_the_vocabulary_are_named(mistral_family, tmp_path):
    out = compose(composite_config(mistral_family, "mmer", ["mistral3"]), str(tmp_path / "c"))
    info = CompositeModel.from_pretrained(out).manifest.modalities[MODALITY["mistral3"]]
    (tmp_path / "c" / info.path / "processor_config.json").write_text('{"image_break_token": "[NOPE]"}')
    with pytest.raises(CompositionError, match=r"lacks \[NOPE\]"):
        CompositeModel.from_pretrained(out)


def test_video_llava_under_an_image_modality_runs_its_image_tower(family, tmp_path):
    """A Video-LLaVA source composed as `image...` (here `image_med`) takes images: its `<image>`
    placeholder (image_token_index) and its image tower, as the source class runs them."""
    src = family.sources["video_llava"]
    out = compose({"merge_method": "mmer", "base_model": str(family.base), "dtype": "float32",
                   "models": [{"model": str(src), "modality": "image_med"}]}, str(tmp_path / "c"))
    proc, model = CompositeProcessor.from_pretrained(out), CompositeModel.from_pretrained(out)
    assert proc.placeholders["image_med"] == "<image>" and proc.kind("image_med") == "image"
    file, decoded = write_media("image", tmp_path)
    inputs = proc("w1 w2 <image> w3", images=[str(file)])
    assert set(inputs["media"]["image_med"]) == {"pixel_values_images"}
    with torch.no_grad():
        got = model(**inputs).logits
    source = transformers.VideoLlavaForConditionalGeneration.from_pretrained(src).eval()
    pixels = source_inputs(src, "image", decoded)["pixel_values"]
    n = model.encoders["image_med"].features(inputs["media"]["image_med"])[0].shape[0]
    ids = transformers.AutoTokenizer.from_pretrained(src)("w1 w2 " + " ".join(["<image>"] * n) + " w3",
                                                           return_tensors="pt").input_ids
    with torch.no_grad():
        want = source(input_ids=ids, pixel_values_images=pixels).logits
    assert got.shape[1] == want.shape[1]
    torch.testing.assert_close(got[..., :V0], want[..., :V0], rtol=1e-4, atol=1e-4)


def test_generic_markers_stand_for_each_modalitys_own_placeholder(two_modalities, tmp_path):
    """`<audio>` means the one audio modality's `<|AUDIO|>`, `<image>` is LLaVA's own token; the ids
    equal those of the prompt written with the sources' own tokens."""
    proc = CompositeProcessor.from_pretrained(two_modalities)
    img, _ = write_media("image", tmp_path)
    wav, _ = write_media("audio", tmp_path)
    media = {"image": [str(img)], "audio": [str(wav)]}
    want = proc("w1 <image> w2 <|AUDIO|> w3", media=media)["input_ids"]
    assert torch.equal(proc("w1 <image> w2 <audio> w3", media=media)["input_ids"], want)
    assert proc.expand_markers("w1 <b> <audio>") == "w1 <b> <|AUDIO|>"  # not a media marker: text


def test_a_generic_marker_with_two_modalities_of_its_kind_needs_the_name():
    from mergekit_multimodal.format.manifest import Manifest, ModalityEntry

    mods = {m: ModalityEntry.model_construct(family="qwen2_audio", placeholder=ph, placeholder_id=i)
            for i, (m, ph) in enumerate((("audio_a", "[A]"), ("audio_b", "[B]")))}
    proc = CompositeProcessor("c", None, Manifest.model_construct(modalities=mods), {})
    assert proc.expand_markers("<audio_b> <audio_a> w1") == "[B] [A] w1"
    with pytest.raises(CompositionError, match="ambiguous: 2 modalities take audios"):
        proc.expand_markers("<audio> w1")
