"""Media files -> arrays, with errors that name the file.

transformers' processors take decoded media (PIL images, waveforms, frame arrays), not paths; this
module does the decoding with what is already installed: PIL for images and GIF/animated frames,
the stdlib `wave` module for WAV, numpy for `.npy`, and PyAV (`pip install av`, optional) for
mp4/webm/mkv/avi video and flac/mp3/ogg/opus/m4a audio. Each loader also accepts an already-decoded
item and passes it through.
"""

from __future__ import annotations

import os
import wave
from typing import Any, Tuple

import numpy as np

from mergekit_multimodal.errors import CompositionError

VIDEO_CONTAINERS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
#: audio files read with PyAV (optional): ModelCompose's MCUB and WavCaps audio is .flac
AUDIO_CONTAINERS = (".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")

#: size budget of one media item (docs/runtime.md): larger inputs are refused, not decoded into memory
MAX_IMAGE_PIXELS = 64_000_000  # 64 megapixels (e.g. 8000 x 8000 is refused)
MAX_VIDEO_FRAMES = 10_000
MAX_VIDEO_PIXELS = 2_000_000_000  # frames x height x width of one video (about 6 GB as RGB uint8)
MAX_AUDIO_SECONDS = 60 * 60  # one hour


def _check_image_size(width: int, height: int, where: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise CompositionError(f"{where}: image of {width} x {height} = {width * height / 1e6:.0f} megapixels is over "
                               f"the budget of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; downscale it first")


def _check_video_size(frames: int, height: int, width: int, where: str) -> None:
    if frames == 0:
        raise CompositionError(f"{where}: the video has no frames")
    if frames > MAX_VIDEO_FRAMES or frames * height * width > MAX_VIDEO_PIXELS:
        raise CompositionError(f"{where}: video of {frames} frames of {width} x {height} is over the budget of "
                               f"{MAX_VIDEO_FRAMES} frames and {MAX_VIDEO_PIXELS / 1e9:.0f} gigapixels; "
                               f"sample or downscale it first")


def _check_finite(arr: np.ndarray, where: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise CompositionError(f"{where}: {int((~np.isfinite(arr)).sum())} value(s) are NaN or inf")


def _path(item: Any, what: str) -> str:
    path = os.fspath(item)
    if not os.path.isfile(path) and not (what == "video" and os.path.isdir(path)):
        raise CompositionError(f"{what} file not found: {path}")
    return path


def load_image(item: Any):
    """A PIL image (RGB) from a path, a PIL image or an H x W x 3 array."""
    from PIL import Image

    if isinstance(item, Image.Image):
        _check_image_size(item.width, item.height, "image")
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        return Image.fromarray(_uint8_frames(item, "image", ndim=3))
    path = _path(item, "image")
    try:
        with Image.open(path) as im:
            _check_image_size(im.width, im.height, path)  # from the header, before decoding
            return im.convert("RGB")
    except CompositionError:
        raise
    except Exception as exc:  # PIL raises several types for bad files
        raise CompositionError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def load_audio(item: Any, sampling_rate: int) -> np.ndarray:
    """A mono float32 waveform at `sampling_rate` from a WAV/.npy path (flac, mp3, ogg... with PyAV),
    an array, or (array, rate)."""
    rate = sampling_rate
    if isinstance(item, tuple):
        item, rate = item
    where = "audio"
    if isinstance(item, np.ndarray):
        wav = item
    else:
        path = where = _path(item, "audio")
        if path.endswith(".npy"):
            wav = _load_npy(path, "audio")
        elif path.lower().endswith(".wav"):
            wav, rate = _read_wav(path)
        elif path.lower().endswith(AUDIO_CONTAINERS):
            wav, rate = _read_audio_container(path)
        else:
            raise CompositionError(f"{path}: audio must be a .wav or .npy file, or {'/'.join(AUDIO_CONTAINERS)} "
                                   f"with PyAV (convert it, e.g. with ffmpeg)")
    wav = np.asarray(wav)
    if not (np.issubdtype(wav.dtype, np.floating) or np.issubdtype(wav.dtype, np.integer)):
        raise CompositionError(f"{where}: audio must be numbers, got dtype {wav.dtype}")
    _check_finite(wav, where)
    wav = wav.astype(np.float32)
    if wav.size == 0:
        raise CompositionError(f"{where}: the audio is empty (0 samples)")
    if wav.ndim == 2:  # (samples, channels) or (channels, samples): average to mono
        wav = wav.mean(axis=1 if wav.shape[0] > wav.shape[1] else 0)
    if wav.ndim != 1 or wav.size == 0:
        raise CompositionError(f"{where}: audio must be a non-empty 1-D waveform, got shape {wav.shape}")
    if not rate or rate <= 0:
        raise CompositionError(f"{where}: sampling rate {rate!r} is not a positive number")
    if wav.size / rate > MAX_AUDIO_SECONDS:
        raise CompositionError(f"{where}: {wav.size / rate:.0f} s of audio is over the budget of "
                               f"{MAX_AUDIO_SECONDS} s; cut it first")
    if rate != sampling_rate:
        wav = _resample(wav, rate, sampling_rate)
    return wav


def load_video(item: Any) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 from .npy, GIF/animated PNG, a folder of images, a video container, or an array."""
    if isinstance(item, np.ndarray):
        return _uint8_frames(item, "video", ndim=4)
    if isinstance(item, (list, tuple)):  # a list of frames (arrays or PIL images)
        if not item:
            raise CompositionError("video: the list of frames is empty")
        return _bounded(np.stack([np.asarray(load_image(f)) for f in item]), "video")
    path = _path(item, "video")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        if not names:
            raise CompositionError(f"{path}: the frame folder is empty")
        if len(names) > MAX_VIDEO_FRAMES:
            _check_video_size(len(names), 1, 1, path)
        return _bounded(np.stack([np.asarray(load_image(os.path.join(path, n))) for n in names]), path)
    low = path.lower()
    if low.endswith(".npy"):
        return _uint8_frames(_load_npy(path, "video"), path, ndim=4)
    if low.endswith(VIDEO_CONTAINERS):
        return _bounded(_read_container(path), path)
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            _check_image_size(im.width, im.height, path)
            _check_video_size(n, im.height, im.width, path)
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    except CompositionError:
        raise
    except Exception as exc:
        raise CompositionError(f"{path}: not a readable video ({type(exc).__name__}: {exc}); "
                               f"give frames as .npy (F, H, W, 3), a GIF, a folder of images or an mp4") from None


def sample_frames(frames: np.ndarray, num_frames: int | None) -> np.ndarray:
    """`num_frames` frames at uniform positions (the models were trained on a fixed count)."""
    if not num_frames or len(frames) == num_frames:
        return frames
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return frames[idx]


def _bounded(frames: np.ndarray, where: str) -> np.ndarray:
    _check_video_size(frames.shape[0], frames.shape[1], frames.shape[2], where)
    return frames


def _uint8_frames(arr: np.ndarray, what: str, ndim: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != ndim or arr.shape[-1] not in (1, 3):
        shape = "H x W x 3" if ndim == 3 else "F x H x W x 3"
        raise CompositionError(f"{what} array must be {shape}, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise CompositionError(f"{what}: array of dtype {arr.dtype} is not pixel values")
    if ndim == 3:
        _check_image_size(arr.shape[1], arr.shape[0], what)
    else:
        _check_video_size(arr.shape[0], arr.shape[1], arr.shape[2], what)
    _check_finite(arr, what)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CompositionError(f"{path}: not a readable .npy {what} ({type(exc).__name__}: {exc})") from None


def _read_wav(path: str) -> Tuple[np.ndarray, int]:
    try:
        with wave.open(path, "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise CompositionError(f"{path}: not a readable WAV file ({exc}); only PCM WAV is read") from None
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        data = np.frombuffer(raw, np.int16 if width == 2 else np.int32).astype(np.float32) / (2 ** (8 * width - 1))
    else:
        raise CompositionError(f"{path}: {8 * width}-bit WAV is not supported (use 8, 16 or 32-bit PCM)")
    return data.reshape(-1, channels), rate


def _resample(wav: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Linear-interpolation resampling: adequate for speech/tones; resample offline for best quality."""
    n = max(1, int(round(len(wav) * dst / src)))
    return np.interp(np.linspace(0, len(wav) - 1, n), np.arange(len(wav)), wav).astype(np.float32)


def _pyav(path: str, what: str, instead: str):
    """PyAV (the optional `av` package), or an error naming the file and what to do instead."""
    try:
        import av
    except ImportError:
        raise CompositionError(f"{path}: reading {os.path.splitext(path)[1]} {what}needs PyAV (pip install av), "
                               f"or {instead}") from None
    return av


def _read_audio_container(path: str) -> Tuple[np.ndarray, int]:
    """(samples, channels) float32 in [-1, 1] at the file's own rate, decoded with PyAV (lossless for flac)."""
    av = _pyav(path, "audio ", "convert it to .wav (e.g. ffmpeg -i in.flac out.wav)")
    try:
        with av.open(path) as container:
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if stream.duration and stream.time_base and float(stream.duration * stream.time_base) > MAX_AUDIO_SECONDS:
                raise CompositionError(f"{path}: {float(stream.duration * stream.time_base):.0f} s of audio is over "
                                       f"the budget of {MAX_AUDIO_SECONDS} s; cut it first")  # before decoding
            to_float = av.AudioResampler(format="fltp")  # planar float, same layout and rate
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
    except CompositionError:
        raise
    except Exception as exc:
        raise CompositionError(f"{path}: not a readable audio file ({type(exc).__name__}: {exc})") from None
    if not chunks:
        raise CompositionError(f"{path}: the audio is empty (0 samples)")
    return np.concatenate(chunks, axis=1).T, int(rate)


def _read_container(path: str) -> np.ndarray:
    av = _pyav(path, "", "give frames as .npy / GIF / a folder of images")
    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as exc:
        raise CompositionError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise CompositionError(f"{path}: the video has no frames")
    return np.stack(frames)
