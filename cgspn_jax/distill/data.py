"""Data: labelled image sources and their grain pipelines.

Three sources, all giving (uint8 image [S, S, 3], int label) records resized to ``image_size``:
- "digits": scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels; shipped with the
  package, no download), upscaled bilinearly; a stratified held-out split.
- an ``.npz`` of arrays: ``images`` [N, H, W] or [N, H, W, 1 | 3] (uint8, or floats in [0, 1]),
  ``labels`` [N] ints; ``heldout_images`` / ``heldout_labels`` if it has its own split.
- an ImageNet-style folder: ROOT/train/CLASS/*.jpg with ROOT/val/CLASS/* (or test/,
  validation/), or ROOT/CLASS/* split into train and held-out; decoded lazily with Pillow.

The training pipeline is a grain MapDataset: shuffle (reshuffled every epoch), repeat forever,
decode + resize, augment (random translation by padding and cropping, optional flips) with a
per-record generator derived from (seed, position), batch. So the order and the augmentation
are functions of the seed and the step alone, and the iterator's state (saved in checkpoints)
is its position. Each process of a multi-host run reads its own slice of every global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from cgspn_jax.distill.config import DistillConfig, DistillError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
HELDOUT_DIRS = ("val", "validation", "test")
# The held-out split must not move with the training seed: results of different seeds are then
# measured on the same images.
SPLIT_SEED = 0


class DataError(DistillError):
    pass


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """[H, W] / [H, W, 1] / [H, W, 3] uint8 or float in [0, 1] -> uint8 [H, W, 3]."""
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


class ArraySource:
    """Random-access records from in-memory arrays (a grain data source)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
        self.images, self.labels, self.image_size = images, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = _resize(_to_rgb_uint8(self.images[index]), self.image_size)
        return {"image": image, "label": np.int32(self.labels[index])}


class FolderSource:
    """Random-access records decoded from image files (a grain data source)."""

    def __init__(self, paths: list[str], labels: np.ndarray, image_size: int):
        self.paths, self.labels, self.image_size = paths, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": decode_image(self.paths[index], self.image_size),
                "label": np.int32(self.labels[index])}


def decode_image(path: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


@dataclasses.dataclass
class Dataset:
    train: ArraySource | FolderSource
    heldout: ArraySource | FolderSource
    class_names: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _stratified_split(labels: np.ndarray, fraction: float):
    from sklearn.model_selection import train_test_split
    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        return train_test_split(indices, test_size=fraction, random_state=SPLIT_SEED,
                                stratify=stratify)
    except ValueError as error:
        raise DataError(f"cannot hold out {fraction} of {len(labels)} examples: {error}") \
            from None


def load_digits(config: DistillConfig) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int32)
    train, heldout = _stratified_split(labels, config.heldout_fraction)
    return Dataset(ArraySource(images[train], labels[train], config.image_size),
                   ArraySource(images[heldout], labels[heldout], config.image_size),
                   [str(d) for d in range(10)],
                   f"scikit-learn digits, 8x8 upscaled to {config.image_size}")


def _check_arrays(path: str, images, labels, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{path}: '{prefix}images' must be [N, H, W] or [N, H, W, 1|3], got "
                        f"shape {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{path}: '{prefix}images' must be uint8 or floats in [0, 1], got "
                        f"{images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype,
                                                                            np.integer):
        raise DataError(f"{path}: '{prefix}labels' must be {len(images)} integers, got shape "
                        f"{labels.shape} of {labels.dtype}")
    if len(labels) == 0:
        raise DataError(f"{path}: '{prefix}images' is empty")
    if labels.min() < 0:
        raise DataError(f"{path}: '{prefix}labels' must be >= 0")
    return images, labels.astype(np.int32)


def load_npz(config: DistillConfig) -> Dataset:
    path = config.data
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    with arrays:
        missing = [k for k in ("images", "labels") if k not in arrays.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {missing}; it has {arrays.files}")
        images, labels = _check_arrays(path, arrays["images"], arrays["labels"])
        if "heldout_images" in arrays.files:
            if "heldout_labels" not in arrays.files:
                raise DataError(f"{path}: has 'heldout_images' but no 'heldout_labels'")
            heldout = _check_arrays(path, arrays["heldout_images"], arrays["heldout_labels"],
                                    "heldout_")
        else:
            train, held = _stratified_split(labels, config.heldout_fraction)
            heldout = images[held], labels[held]
            images, labels = images[train], labels[train]
    num_classes = int(max(labels.max(), heldout[1].max())) + 1
    return Dataset(ArraySource(images, labels, config.image_size),
                   ArraySource(*heldout, config.image_size),
                   [str(c) for c in range(num_classes)], f"{path} ({len(labels)} train)")


def _list_class_folder(root: str, class_names: list[str] | None = None):
    """(paths, labels, class_names) of ROOT/CLASS/*.ext; classes sorted by name."""
    if class_names is None:
        class_names = sorted(d for d in os.listdir(root)
                             if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, file))
                labels.append(label)
    return paths, np.asarray(labels, np.int32), class_names


def load_folder(config: DistillConfig) -> Dataset:
    root = config.data
    train_root = os.path.join(root, "train")
    heldout_root = next((os.path.join(root, d) for d in HELDOUT_DIRS
                         if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(train_root) and heldout_root is not None:
        paths, labels, class_names = _list_class_folder(train_root)
        held_paths, held_labels, _ = _list_class_folder(heldout_root, class_names)
        if len(held_paths) == 0:
            raise DataError(f"{heldout_root}: no images in its class folders "
                            f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    else:
        paths, labels, class_names = _list_class_folder(root)
        held_paths = None
    if len(paths) == 0:
        raise DataError(f"{root}: no images found; expected ROOT/CLASS/*.png (or "
                        f"ROOT/train/CLASS/* and ROOT/val/CLASS/*), extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    if held_paths is None:
        train, held = _stratified_split(labels, config.heldout_fraction)
        held_paths, held_labels = [paths[i] for i in held], labels[held]
        paths, labels = [paths[i] for i in train], labels[train]
    decode_image(paths[0], config.image_size)  # fail now, not mid-run, if the first is bad
    return Dataset(FolderSource(paths, labels, config.image_size),
                   FolderSource(held_paths, held_labels, config.image_size), class_names,
                   f"{root} ({len(paths)} train images, {len(class_names)} classes)")


def load_dataset(config: DistillConfig) -> Dataset:
    """The train and held-out sources named by ``config.data``; DataError if unusable."""
    data = config.data
    if data == "digits":
        return load_digits(config)
    if not os.path.exists(data):
        raise DataError(f"--data {data}: no such file or folder (or use 'digits')")
    if os.path.isdir(data):
        return load_folder(config)
    if data.endswith(".npz"):
        return load_npz(config)
    raise DataError(f"--data {data}: expected 'digits', an .npz file or an image folder")


# ----------------------------------------------------------------------------- pipelines


def augment(record: dict, rng: np.random.Generator, *, max_shift: int, hflip: bool) -> dict:
    """Random translation by up to ``max_shift`` pixels (edge padding, then a crop), and a
    horizontal flip with probability 1/2 if ``hflip``."""
    image = record["image"]
    if max_shift:
        size = image.shape[0]
        padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                        mode="edge")
        top, left = rng.integers(0, 2 * max_shift + 1, size=2)
        image = padded[top:top + size, left:left + size]
    if hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": record["label"]}


def train_iterator(source, config: DistillConfig, *, local_batch: int, process_index: int = 0,
                   process_count: int = 1, seed_offset: int = 0):
    """An endless, checkpointable grain iterator of {"image": uint8 [b, S, S, 3], "label"}.

    ``seed_offset`` gives each training stage its own order from the same seed.
    """
    seed = config.seed + 1000 * seed_offset
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    if config.augment and (config.max_shift or config.hflip):
        # A partial of a module-level function, not a lambda: worker processes unpickle it.
        ds = ds.random_map(functools.partial(augment, max_shift=config.max_shift,
                                             hflip=config.hflip), seed=seed)
    # Global batch k is made of the positions [k * G, (k + 1) * G), each process holding every
    # process_count-th; augmented before slicing, so that the augmentation of a position does
    # not depend on the number of processes.
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset()
    if config.workers:
        # Grain's workers read absl flags, which only an absl app parses: take their defaults.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    return iter(ds)


def eval_batches(source, *, local_batch: int, process_index: int = 0, process_count: int = 1):
    """Held-out batches padded to ``local_batch``: ({"image", "label"}, mask [b] bool).

    Every process yields the same number of batches (a multi-host evaluation steps together).
    """
    per_process = -(-len(source) // process_count)
    num_batches = -(-per_process // local_batch)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    records = iter(ds.batch(local_batch, drop_remainder=False))
    for _ in range(num_batches):
        batch = next(records, None)
        valid = 0 if batch is None else len(batch["label"])
        if batch is None:
            batch = {"image": np.zeros((local_batch, source.image_size, source.image_size, 3),
                                       np.uint8), "label": np.zeros((local_batch,), np.int32)}
        elif valid < local_batch:
            pad = lambda a: np.concatenate([a, np.repeat(a[-1:], local_batch - valid, 0)])
            batch = {k: pad(v) for k, v in batch.items()}
        yield batch, np.arange(local_batch) < valid
