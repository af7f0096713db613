"""`encode`: jit-compiled inference of a `ViT` or `CGSPNEncoder` on raw images."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgspn_jax.models.vit import VisionEncoder

# How many times `_encode_batch` was traced (= compiled): tests check it compiles once per shape.
trace_count = 0


def preprocess(images: jax.Array, *, mean, std, resize_to: tuple[int, int] | None,
               dtype) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> (images - mean) / std, optionally resized
    (bilinear, antialiased when shrinking) to ``resize_to`` = (height, width)."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if resize_to is not None and tuple(x.shape[1:3]) != tuple(resize_to):
        x = jax.image.resize(x, (x.shape[0], *resize_to, x.shape[3]), method="bilinear",
                             antialias=True)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "mean", "std", "resize_to",
                                             "normalize", "features"))
def _encode_batch(graphdef, state, images, *, mean, std, resize_to, normalize, features):
    global trace_count
    trace_count += 1
    model = nnx.merge(graphdef, state)
    dtype = model.config.dtype
    if normalize:
        x = preprocess(images, mean=mean, std=std, resize_to=resize_to, dtype=dtype)
    else:
        x = images.astype(dtype)
    out = model.features(x) if features else model(x)
    return out.astype(jnp.float32)


def _as_hw(size, name) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in hw):
        raise ValueError(f"{name} must be None, a positive int or (height, width), got {size!r}")
    return tuple(int(s) for s in hw)


def encode(model: VisionEncoder, images, *, resize_to=None, batch_size: int = 32,
           normalize: bool = True, features: bool = False, output: str = "numpy"):
    """Embeds images with ``model`` in batches under one jit-compiled function per batch shape.

    Args:
      model: a `ViT` or `CGSPNEncoder`; computes in its ``config.dtype``.
      images: [N, H, W, in_channels] (or one image [H, W, in_channels]): uint8 in [0, 255] or
        floats in [0, 1]; with ``normalize=False``, floats already normalised for the model.
      resize_to: None (keep H x W: must then be multiples of the patch size), an int or
        (height, width); "model" resizes to the model's ``config.image_size``.
      batch_size: images per compiled call; the last batch is padded so that every call has
        the same shape and compiles once.
      normalize: apply the model's pixel normalisation (SigLIP: (x - 0.5) / 0.5 on [0, 1]).
      features: return the final token grid [N, h, w, width] instead of the pooled embedding.
      output: "numpy" (host float32 arrays) or "jax" (device float32 arrays).

    Returns:
      [N, width] embeddings (float32), or [N, h, w, width] with ``features``; one image in,
      one embedding out (no batch axis).
    """
    if not isinstance(model, VisionEncoder):
        raise TypeError(f"model must be a ViT or CGSPNEncoder, got {type(model).__name__}")
    if output not in ("numpy", "jax"):
        raise ValueError(f"output must be 'numpy' or 'jax', got {output!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    config = model.config
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != config.in_channels:
        raise ValueError(f"images must have shape [N, H, W, {config.in_channels}] or "
                         f"[H, W, {config.in_channels}], got {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError(f"images: expected at least one image [N >= 1, H, W, C], got shape "
                         f"{tuple(images.shape)}")
    if images.dtype != np.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if images.dtype == np.uint8 and not normalize:
        raise ValueError("normalize=False expects float images already normalised, got uint8")
    resize_to = config.image_hw if isinstance(resize_to, str) and resize_to == "model" else \
        _as_hw(resize_to, "resize_to")
    out_hw = resize_to or tuple(images.shape[1:3])
    if any(s % config.patch_size for s in out_hw):
        raise ValueError(f"images: height and width {out_hw} must be multiples of the patch "
                         f"size {config.patch_size}; pass resize_to")

    graphdef, state = nnx.split(model)
    run = functools.partial(
        _encode_batch, graphdef, state, mean=tuple(map(float, config.pixel_mean)),
        std=tuple(map(float, config.pixel_std)), resize_to=resize_to, normalize=normalize,
        features=features)
    count = images.shape[0]
    batch = min(batch_size, count)
    outputs, in_flight = [], []
    for start in range(0, count, batch):
        chunk = images[start:start + batch]
        real = chunk.shape[0]
        if real < batch:  # pad with copies of the last image: same shape, no recompilation
            pad = [chunk[-1:]] * (batch - real)
            chunk = (jnp.concatenate if isinstance(chunk, jax.Array) else np.concatenate)(
                [chunk, *pad])
        in_flight.append(run(chunk)[:real])
        # Fetch the previous batch only once the next one is dispatched, so that the device
        # does not wait for the host copy.
        if output == "numpy" and len(in_flight) > 1:
            outputs.append(np.asarray(in_flight.pop(0)))
    outputs += [np.asarray(o) for o in in_flight] if output == "numpy" else in_flight
    result = (np.concatenate if output == "numpy" else jnp.concatenate)(outputs)
    return result[0] if single else result
