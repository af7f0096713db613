"""Pretrained SigLIP teachers: Hugging Face and big_vision checkpoints into `ViT`, and this
library's own teacher format.

    teacher = load_teacher("path/to/siglip-so400m-patch14-384")   # HF dir: config + safetensors
    teacher = load_teacher("webli_en_so400m_224.npz")             # big_vision SigLIP
    save_teacher(teacher, "runs/teacher")                         # orbax, reloadable
    teacher = load_teacher("runs/teacher")

The architecture is read off the checkpoint (width, depth, heads, MLP size, patch and image size,
layer-norm epsilon, pooling head). Every tensor is mapped by an explicit rule (name, layout
change); missing, unexpected or mis-shaped tensors are all listed in one error. Tensors are read
one at a time (safetensors' lazy reader, numpy's per-member npz reader) into a model built
abstractly, so no random initialisation runs and no second copy of the checkpoint is held.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgspn_jax.models.vit import ViT, config_to_json

NATIVE_METADATA = "cgspn_teacher.json"
NATIVE_FORMAT = "cgspn_jax.ViT"

# A rule: our parameter path -> (source tensor name, transform of the source array).
Rules = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]
_same = lambda a: a
_transpose = lambda a: a.T  # torch Linear [out, in] -> our kernel [in, out]


def load_teacher(path: str | os.PathLike, *, dtype=jnp.float32, **overrides) -> ViT:
    """A ready `ViT` from a HF SigLIP directory, a big_vision `.npz`, or `save_teacher`'s output.

    ``dtype`` is the computation dtype (parameters stay float32); ``overrides`` change config
    fields that do not alter parameter shapes (e.g. ``attention_implementation``, ``remat``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no teacher checkpoint at {path}")
    if path.is_dir() and (path / NATIVE_METADATA).exists():
        return _load_native(path, dtype, overrides)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hugging_face(path, dtype, overrides)
    if path.is_file() and path.suffix == ".npz":
        return _load_big_vision(path, dtype, overrides)
    raise ValueError(f"path: {path} is neither a Hugging Face SigLIP directory (config.json + "
                     f"safetensors), a big_vision .npz, nor a directory written by save_teacher")


# ----------------------------------------------------------------------------- building


def _param_paths(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Our parameters by dotted path ("blocks.0.mixer.query.kernel") -> abstract array."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_dotted(path): leaf for path, leaf in flat}


def _dotted(key_path) -> str:
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.GetAttrKey):  # the Variable's own `.value`
            continue
        parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
    return ".".join(parts)


# Config fields a checkpoint's parameters fix: overriding them would mismatch its tensors.
_SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size",
                 "in_channels", "posemb", "pool")


def _check_overrides(overrides: dict) -> None:
    clash = sorted(set(_SHAPE_FIELDS) & set(overrides))
    if clash:
        raise ValueError(f"overrides {clash} would change the parameter shapes the checkpoint "
                         f"defines; only other fields (e.g. attention_implementation, remat) "
                         f"may be overridden")


def _build(config: dict, dtype, overrides: dict, read: Callable[[str], np.ndarray],
           available: set[str], rules: Rules, ignored: Callable[[str], bool]) -> ViT:
    """A ViT of ``config`` whose every parameter comes from ``read(rules[path][0])``."""
    _check_overrides(overrides)
    model = _abstract_vit(config, dtype, overrides)
    wanted = _param_paths(model)
    missing = sorted(src for path, (src, _) in rules.items() if path in wanted and src not in available)
    unmapped = sorted(set(wanted) - set(rules))
    used = {src for path, (src, _) in rules.items() if path in wanted}
    unexpected = sorted(k for k in available - used if not ignored(k))
    values, misshaped = {}, []
    if not (missing or unmapped or unexpected):
        for path, leaf in wanted.items():
            src, transform = rules[path]
            array = np.asarray(transform(read(src)), np.float32)
            if array.shape != tuple(leaf.shape):
                misshaped.append(f"{src}: gives {array.shape}, expected {tuple(leaf.shape)} "
                                 f"for {path}")
                continue
            values[path] = jnp.asarray(array)
    problems = [f"missing tensors: {missing}" if missing else "",
                f"parameters with no rule: {unmapped}" if unmapped else "",
                f"unexpected tensors: {unexpected}" if unexpected else "",
                f"mis-shaped tensors: {misshaped}" if misshaped else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("checkpoint does not match the ViT it describes: " + "; ".join(problems))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    params = jax.tree_util.tree_unflatten(treedef, [values[_dotted(p)] for p, _ in flat])
    return nnx.merge(graphdef, params, rest)


def _abstract_vit(config: dict, dtype, overrides: dict) -> ViT:
    """A ViT with ShapeDtypeStruct parameters (nothing initialised) for ``config``, whose every
    shape-defining field is given; ``config["variant"]`` (a label) defaults to "custom"."""
    config = dict(config)
    label = config.pop("variant", "custom")
    # The variant's own sizes are all overridden; "B" only seeds the config.
    model = nnx.eval_shape(lambda: ViT("B", rngs=nnx.Rngs(0), dtype=dtype, **config, **overrides))
    model.config = dataclasses.replace(model.config, variant=label)
    return model


def _attention_rules(ours: str, theirs: str, names: dict[str, str], kernel, bias,
                     kernel_name: str = "kernel") -> Rules:
    """Rules for the q/k/v/out projections: ``theirs`` is a template of (projection, tensor)."""
    rules = {}
    for our_name, their_name in names.items():
        rules[f"{ours}.{our_name}.kernel"] = (theirs.format(their_name, kernel_name),
                                              kernel(our_name))
        rules[f"{ours}.{our_name}.bias"] = (theirs.format(their_name, "bias"), bias(our_name))
    return rules


# ----------------------------------------------------------------------------- Hugging Face

_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                           hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                           vision_use_head=True)


def _hugging_face_config(directory: Path) -> dict:
    with open(directory / "config.json") as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type == "siglip":
        vision = raw.get("vision_config") or {}
    elif model_type == "siglip_vision_model":
        vision = raw
    else:
        raise ValueError(f"config.json: model_type {model_type!r} is not a SigLIP model "
                         f"('siglip' or 'siglip_vision_model'); SigLIP 2 NaFlex checkpoints "
                         f"('siglip2') use another patch embedding and are not supported")
    vision = {**_HF_VISION_DEFAULTS, **vision}
    if vision["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"config.json: hidden_act {vision['hidden_act']!r} is not supported "
                         f"(ViT uses the tanh-approximated GELU, 'gelu_pytorch_tanh')")
    return dict(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                mlp_dim=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                patch_size=vision["patch_size"], image_size=vision["image_size"],
                in_channels=vision["num_channels"], layer_norm_eps=vision["layer_norm_eps"],
                pool="map" if vision["vision_use_head"] else "gap", posemb="learn")


def _hugging_face_rules(config: dict, p: str) -> Rules:
    """Rules for tensors named ``p + <SiglipVisionTransformer name>``."""
    width, grid = config["width"], config["image_size"] // config["patch_size"]
    rules: Rules = {
        "patch_embed.conv.kernel": (p + "embeddings.patch_embedding.weight",
                                    lambda a: a.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        "patch_embed.conv.bias": (p + "embeddings.patch_embedding.bias", _same),
        "pos_emb": (p + "embeddings.position_embedding.weight",
                    lambda a: a.reshape(1, grid, grid, width)),  # row-major token order
        "norm.scale": (p + "post_layernorm.weight", _same),
        "norm.bias": (p + "post_layernorm.bias", _same),
    }
    for i in range(config["depth"]):
        ours, theirs = f"blocks.{i}", f"{p}encoder.layers.{i}"
        for n in ("1", "2"):
            rules[f"{ours}.norm{n}.scale"] = (f"{theirs}.layer_norm{n}.weight", _same)
            rules[f"{ours}.norm{n}.bias"] = (f"{theirs}.layer_norm{n}.bias", _same)
        rules.update(_attention_rules(
            f"{ours}.mixer", theirs + ".self_attn.{}_proj.{}",
            {"query": "q", "key": "k", "value": "v", "out": "out"},
            kernel=lambda _: _transpose, bias=lambda _: _same, kernel_name="weight"))
        for fc in ("fc1", "fc2"):
            rules[f"{ours}.mlp.{fc}.kernel"] = (f"{theirs}.mlp.{fc}.weight", _transpose)
            rules[f"{ours}.mlp.{fc}.bias"] = (f"{theirs}.mlp.{fc}.bias", _same)
    if config["pool"] == "map":
        h = p + "head."
        rules["head.probe"] = (h + "probe", _same)
        # torch.nn.MultiheadAttention packs q, k, v as the rows of one in-projection.
        packed = {"query": 0, "key": 1, "value": 2}
        for name, i in packed.items():
            rows = slice(i * width, (i + 1) * width)
            rules[f"head.attention.{name}.kernel"] = (h + "attention.in_proj_weight",
                                                      lambda a, r=rows: a[r].T)
            rules[f"head.attention.{name}.bias"] = (h + "attention.in_proj_bias",
                                                    lambda a, r=rows: a[r])
        rules["head.attention.out.kernel"] = (h + "attention.out_proj.weight", _transpose)
        rules["head.attention.out.bias"] = (h + "attention.out_proj.bias", _same)
        rules["head.norm.scale"] = (h + "layernorm.weight", _same)
        rules["head.norm.bias"] = (h + "layernorm.bias", _same)
        for fc in ("fc1", "fc2"):
            rules[f"head.mlp.{fc}.kernel"] = (f"{h}mlp.{fc}.weight", _transpose)
            rules[f"head.mlp.{fc}.bias"] = (f"{h}mlp.{fc}.bias", _same)
    return rules


def _load_hugging_face(directory: Path, dtype, overrides) -> ViT:
    from safetensors import safe_open

    config = _hugging_face_config(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            files = {name: directory / file for name, file in json.load(f)["weight_map"].items()}
    elif (directory / "model.safetensors").exists():
        with safe_open(directory / "model.safetensors", framework="numpy") as f:
            files = {name: directory / "model.safetensors" for name in f.keys()}
    else:
        raise FileNotFoundError(f"path: {directory} has config.json but neither "
                                f"model.safetensors nor model.safetensors.index.json")

    def read(name: str) -> np.ndarray:
        # "flax" reads bfloat16 too (numpy has no such dtype); one tensor at a time.
        with safe_open(files[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name).astype(jnp.float32))

    # An image-text model, and older transformers' vision models, prefix the vision tower's
    # tensors with "vision_model."; the rest (text tower, logit scale and bias) is not ours.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in files) else ""
    outside_vision_tower = lambda name: not name.startswith(prefix)
    return _build(config, dtype, overrides, read, set(files), _hugging_face_rules(config, prefix),
                  ignored=outside_vision_tower)


# ----------------------------------------------------------------------------- big_vision


def _big_vision_prefix(keys: set[str]) -> str:
    for prefix in ("params/img/", "img/", "params/", ""):
        if f"{prefix}embedding/kernel" in keys:
            return prefix
    raise ValueError("npz: no image-tower patch embedding ('params/img/embedding/kernel' or "
                     "'embedding/kernel'); not a big_vision ViT / SigLIP checkpoint")


def _big_vision_block_reader(keys: set[str], prefix: str, npz):
    """Reads block i's tensor `name` from per-block keys or from a scanned stack."""
    stacked = f"{prefix}Transformer/encoderblock/"

    def block_key(i: int, name: str) -> str:
        return f"{prefix}Transformer/encoderblock_{i}/{name}"

    if any(k.startswith(stacked) for k in keys):
        depth = npz[f"{stacked}LayerNorm_0/scale"].shape[0]
        # Per-block names are virtual here; read() slices the stack.
        virtual = {block_key(i, k[len(stacked):]) for k in keys if k.startswith(stacked)
                   for i in range(depth)}
        return depth, virtual, lambda name: _slice_stack(npz, stacked, prefix, name)
    depth = sum(1 for k in keys if k.startswith(f"{prefix}Transformer/encoderblock_")
                and k.endswith("/LayerNorm_0/scale"))
    return depth, set(), None


def _slice_stack(npz, stacked, prefix, name):
    rest = name[len(f"{prefix}Transformer/encoderblock_"):]
    index, _, inner = rest.partition("/")
    return npz[stacked + inner][int(index)]


def _load_big_vision(path: Path, dtype, overrides) -> ViT:
    npz = np.load(path, allow_pickle=False)  # members are read on access
    keys = set(npz.files)
    prefix = _big_vision_prefix(keys)
    depth, virtual, read_stacked = _big_vision_block_reader(keys, prefix, npz)
    if depth == 0:
        raise ValueError(f"npz: no encoder blocks under {prefix}Transformer/")
    kernel = npz[f"{prefix}embedding/kernel"]  # [p, p, in, width]
    block0 = lambda name: (read_stacked or npz.__getitem__)(
        f"{prefix}Transformer/encoderblock_0/{name}")
    query = block0("MultiHeadDotProductAttention_0/query/kernel")  # [width, heads, head_dim]
    width, patch = kernel.shape[3], kernel.shape[0]
    config = dict(width=width, depth=depth, mlp_dim=block0("MlpBlock_0/Dense_0/kernel").shape[1],
                  num_heads=query.shape[1], patch_size=patch, in_channels=kernel.shape[2],
                  layer_norm_eps=1e-6,  # flax.linen.LayerNorm's default, used by big_vision
                  pool="map" if f"{prefix}MAPHead_0/probe" in keys else "gap")
    if f"{prefix}cls" in keys:
        raise ValueError("npz: class-token pooling ('cls') is not supported; ViT pools with a "
                         "MAP head or the mean")
    if f"{prefix}pos_embedding" in keys:
        tokens = npz[f"{prefix}pos_embedding"].shape[1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"npz: pos_embedding holds {tokens} tokens, not a square grid")
        config.update(posemb="learn", image_size=grid * patch)
    else:
        config.update(posemb="none")
    grid = config.get("image_size", patch) // patch

    heads_to_matrix = lambda a: a.reshape(a.shape[0], -1)          # [C, h, d] -> [C, C]
    out_to_matrix = lambda a: a.reshape(-1, a.shape[-1])           # [h, d, C] -> [C, C]
    flat = lambda a: a.reshape(-1)                                  # [h, d] -> [C]
    attention = {"query": "query", "key": "key", "value": "value", "out": "out"}
    attn_kernel = lambda n: out_to_matrix if n == "out" else heads_to_matrix
    attn_bias = lambda n: _same if n == "out" else flat

    p = prefix
    rules: Rules = {
        "patch_embed.conv.kernel": (f"{p}embedding/kernel", _same),
        "patch_embed.conv.bias": (f"{p}embedding/bias", _same),
        "pos_emb": (f"{p}pos_embedding", lambda a: a.reshape(1, grid, grid, width)),
        "norm.scale": (f"{p}Transformer/encoder_norm/scale", _same),
        "norm.bias": (f"{p}Transformer/encoder_norm/bias", _same),
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"{p}Transformer/encoderblock_{i}/"
        for n, ln in (("1", "LayerNorm_0"), ("2", "LayerNorm_1")):
            rules[f"{ours}.norm{n}.scale"] = (f"{theirs}{ln}/scale", _same)
            rules[f"{ours}.norm{n}.bias"] = (f"{theirs}{ln}/bias", _same)
        rules.update(_attention_rules(f"{ours}.mixer", theirs + "MultiHeadDotProductAttention_0/{}/{}",
                                      attention, attn_kernel, attn_bias))
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            rules[f"{ours}.mlp.{fc}.kernel"] = (f"{theirs}MlpBlock_0/{dense}/kernel", _same)
            rules[f"{ours}.mlp.{fc}.bias"] = (f"{theirs}MlpBlock_0/{dense}/bias", _same)
    head = f"{p}MAPHead_0/"
    rules["head.probe"] = (f"{head}probe", _same)
    rules.update(_attention_rules("head.attention", head + "MultiHeadDotProductAttention_0/{}/{}",
                                  attention, attn_kernel, attn_bias))
    rules["head.norm.scale"] = (f"{head}LayerNorm_0/scale", _same)
    rules["head.norm.bias"] = (f"{head}LayerNorm_0/bias", _same)
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        rules[f"head.mlp.{fc}.kernel"] = (f"{head}MlpBlock_0/{dense}/kernel", _same)
        rules[f"head.mlp.{fc}.bias"] = (f"{head}MlpBlock_0/{dense}/bias", _same)

    stacked = f"{p}Transformer/encoderblock/"
    available = (keys | virtual) - {k for k in keys if k.startswith(stacked)}

    def read(name: str) -> np.ndarray:
        if name in virtual:
            return read_stacked(name)
        return npz[name]

    outside_image_tower = lambda k: not k.startswith(p) or (
        p == "" and k.split("/")[0] in ("txt", "t", "b"))
    if p.startswith("params/"):
        outside_image_tower = lambda k: not k.startswith(p)
    return _build(config, dtype, overrides, read, available, rules, ignored=outside_image_tower)


# ----------------------------------------------------------------------------- native format


def save_teacher(model: ViT, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``model`` (parameters and config) to the directory ``path``, in orbax format.

    The checkpoint is written to a temporary sibling and moved into place only once complete, so
    an interrupted save leaves any earlier checkpoint at ``path`` intact.
    """
    import orbax.checkpoint as ocp

    if not isinstance(model, ViT):
        raise TypeError(f"model must be a cgspn_jax.ViT, got {type(model).__name__}")
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _, params, _ = nnx.split(model, nnx.Param, ...)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
        metadata = {"format": NATIVE_FORMAT, "version": 1, "config": config_to_json(model.config)}
        with open(staging / NATIVE_METADATA, "w") as f:
            json.dump(metadata, f, indent=2)
        if path.exists():
            retired = path.with_name(f".{path.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _load_native(directory: Path, dtype, overrides) -> ViT:
    import orbax.checkpoint as ocp

    with open(directory / NATIVE_METADATA) as f:
        metadata = json.load(f)
    if metadata.get("format") != NATIVE_FORMAT:
        raise ValueError(f"path: {directory / NATIVE_METADATA} is not a cgspn_jax teacher "
                         f"(format {metadata.get('format')!r})")
    _check_overrides(overrides)
    config = dict(metadata["config"])
    config.pop("dtype", None)
    config.update(overrides)
    model = _abstract_vit(config, dtype, {})
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", abstract)
    return nnx.merge(graphdef, params, rest)
