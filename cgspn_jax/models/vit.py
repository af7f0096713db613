"""The SigLIP-style ViT teacher, and the encoder skeleton it shares with the C-GSPN student.

A whole model in one file, in the manner of big_vision's `models/vit.py`: the variant name
("So400m/14") decodes to width, depth, MLP size, heads and patch; keyword overrides change any of
them. Modules are plain Flax NNX objects:

    images [B, H, W, 3]  -> patch_embed (conv, stride = patch)   -> tokens [B, h, w, C]
                         -> + pos_emb (bilinear to h x w)        (ViT; off by default in C-GSPN)
                         -> blocks[0..depth-1]                   (pre-LN: mixer, then MLP)
                         -> norm                                 -> features [B, h, w, C]
                         -> head (MAP attention pooling, or mean) -> embedding [B, C]

Tokens stay a 2D grid [B, h, w, C] from the patch embedding to the head: the C-GSPN scan needs
the 2D layout, and attention flattens it to [B, h*w, C] only inside itself. So the teacher's and
the student's blocks take and return the same arrays, and distillation can feed one to the other.

Precision: parameters are float32; ``dtype`` (float32 by default, bfloat16 on GPU) is the
computation dtype of every layer and of the returned arrays.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# big_vision's decoding of variant names: "So400m/14" = width 1152, depth 27, MLP 4304, 16 heads,
# patch 14. "mu" is a toy size for tests.
_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152,
          "H": 1280, "g": 1408, "G": 1664}
_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27, "H": 32, "g": 40,
          "G": 48}
_MLP_DIM = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304,
            "H": 5120, "g": 6144, "G": 8192}
_NUM_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16, "g": 16,
              "G": 16}

# Pixel normalisation of SigLIP: (x / 255 - 0.5) / 0.5, i.e. mean 0.5 and std 0.5 on [0, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def decode_variant(variant: str) -> dict[str, int]:
    """``"So400m/14"`` -> {"width": 1152, "depth": 27, "mlp_dim": 4304, "num_heads": 16,
    "patch_size": 14}; the patch part is optional ("B" gives no patch_size)."""
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'B/16', got {variant!r}")
    size, _, patch = variant.partition("/")
    if size not in _WIDTH:
        raise ValueError(f"variant {variant!r}: unknown size {size!r}; expected one of "
                         f"{sorted(_WIDTH)} optionally followed by '/patch', e.g. 'So400m/14'")
    config = {"width": _WIDTH[size], "depth": _DEPTH[size], "mlp_dim": _MLP_DIM[size],
              "num_heads": _NUM_HEADS[size]}
    if patch:
        if not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"variant {variant!r}: the patch size after '/' must be a positive "
                             f"integer, got {patch!r}")
        config["patch_size"] = int(patch)
    return config


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT; built by `make_config` from a variant name + overrides."""

    variant: str = "B/16"
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    patch_size: int = 16
    # The image size the position embedding is laid out for (a grid of image_size / patch);
    # other sizes interpolate it. Also the default resize target of `encode`.
    image_size: int | tuple[int, int] = 224
    in_channels: int = 3
    layer_norm_eps: float = 1e-6     # of every LayerNorm (SigLIP: 1e-6; read off checkpoints)
    posemb: str = "learn"            # "learn" or "none"
    pool: str = "map"                # "map" (SigLIP attention pooling) or "gap" (mean)
    dtype: Any = jnp.float32         # computation dtype; parameters are always float32
    # jax.nn.dot_product_attention implementation: "auto" picks "cudnn" (flash attention, O(N)
    # memory) for 16-bit dtypes when the default backend is a GPU, else "xla". Or None / "xla" /
    # "cudnn" to force one.
    attention_implementation: str | None = "auto"
    remat: bool = False              # rematerialise each block in the backward (saves memory)
    pixel_mean: tuple[float, ...] = SIGLIP_MEAN   # preprocessing of `encode`, on [0, 1] pixels
    pixel_std: tuple[float, ...] = SIGLIP_STD

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The token grid of `image_size`: the layout of the learned position embedding."""
        return tuple(max(1, s // self.patch_size) for s in self.image_hw)

    def validate(self) -> None:
        for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "in_channels"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width = {self.width} must be divisible by num_heads = "
                             f"{self.num_heads}")
        size = self.image_size
        sides = (size,) if is_positive_int(size) else size if isinstance(size, tuple) else ()
        if len(sides) not in (1, 2) or not all(is_positive_int(s) for s in sides):
            raise ValueError(f"image_size must be a positive int or (height, width) of positive "
                             f"ints, got {size!r}")
        if self.posemb not in ("learn", "none"):
            raise ValueError(f"posemb must be 'learn' or 'none', got {self.posemb!r}")
        if self.pool not in ("map", "gap"):
            raise ValueError(f"pool must be 'map' or 'gap', got {self.pool!r}")
        if self.attention_implementation not in ("auto", None, "xla", "cudnn"):
            raise ValueError(f"attention_implementation must be 'auto', None, 'xla' or "
                             f"'cudnn', got {self.attention_implementation!r}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                         jnp.dtype(jnp.float16)):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a positive number, got "
                             f"{self.layer_norm_eps!r}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"{name} must have in_channels = {self.in_channels} entries, "
                                 f"got {getattr(self, name)!r}")


def is_positive_int(value) -> bool:
    """True for positive Python or numpy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def make_config(config_class, variant: str, overrides: dict):
    """``config_class`` filled from the variant name, then from ``overrides`` (any field)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {config_class.__name__}; "
                        f"expected some of {sorted(fields - {'variant'})}")
    values = dict(decode_variant(variant), variant=variant)
    values.update(overrides)
    if "dtype" in values:
        values["dtype"] = jnp.dtype(values["dtype"]).type
    # Sequences become tuples (configs are hashable jit statics; JSON gives lists), numpy
    # integers Python ints.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    values = {k: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
              for k, v in values.items()}
    if isinstance(values.get("image_size"), tuple):
        values["image_size"] = tuple(int(s) if isinstance(s, numbers.Integral) else s
                                     for s in values["image_size"])
    config = config_class(**values)
    config.validate()
    return config


def vit_config(variant: str = "B/16", **overrides) -> ViTConfig:
    """The `ViTConfig` of a variant name with overrides, e.g. vit_config("S/16", depth=6)."""
    return make_config(ViTConfig, variant, overrides)


def config_to_json(config) -> dict:
    """Every field of a `ViTConfig` (or subclass) as JSON values: the dtype by name, tuples as
    lists, numpy scalars as Python numbers. ``make_config(type(config), d.pop("variant"), d)``
    (or the encoder class with ``variant`` and the rest as overrides) rebuilds the config."""

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value.item() if isinstance(value, np.generic) else value

    values = {k: plain(v) for k, v in dataclasses.asdict(config).items()}
    values["dtype"] = jnp.dtype(config.dtype).name
    return values


# ----------------------------------------------------------------------------- layers


def _dense(in_features, out_features, dtype, rngs, **kwargs) -> nnx.Linear:
    # big_vision initialises the ViT's dense kernels Xavier-uniform.
    kwargs.setdefault("kernel_init", nnx.initializers.xavier_uniform())
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs, **kwargs)


def _layer_norm(width, dtype, rngs, epsilon: float = 1e-6) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def check_grid(x: jax.Array, width: int, name: str = "x") -> None:
    """Raises ValueError unless x is a token grid [B, h, w, width]."""
    if x.ndim != 4 or x.shape[-1] != width:
        raise ValueError(f"{name} must be a token grid [B, h, w, C] with C = {width}, got shape "
                         f"{tuple(x.shape)}")


class PatchEmbed(nnx.Module):
    """Images [B, H, W, in_channels] -> token grid [B, H/p, W/p, width]: a p x p conv, stride p."""

    def __init__(self, patch_size: int, in_channels: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.conv = nnx.Conv(in_channels, width, (patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID", use_bias=True,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"images must have shape [B, H, W, {self.in_channels}] "
                             f"(channels last), got {tuple(images.shape)}")
        height, width = images.shape[1:3]
        if height % p or width % p or height == 0 or width == 0:
            raise ValueError(f"images: height and width must be positive multiples of the patch "
                             f"size {p}, got {height} x {width}")
        return self.conv(images)


class MLP(nnx.Module):
    """Linear(width -> mlp_dim), tanh-approximated GELU, Linear(mlp_dim -> width)."""

    def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        # big_vision's MlpBlock: Xavier kernels, biases ~ N(0, 1e-6).
        bias_init = nnx.initializers.normal(stddev=1e-6)
        self.fc1 = _dense(width, mlp_dim, dtype, rngs, bias_init=bias_init)
        self.fc2 = _dense(mlp_dim, width, dtype, rngs, bias_init=bias_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def _choose_attention_implementation(requested, dtype) -> str | None:
    if requested != "auto":
        return requested
    # cuDNN flash attention needs 16-bit inputs; it keeps memory O(tokens), where XLA's
    # attention materialises the tokens x tokens scores.
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if sixteen_bit and jax.default_backend() == "gpu" else "xla"


class Attention(nnx.Module):
    """Multi-head dot-product attention through `jax.nn.dot_product_attention`.

    ``attention(x)`` is self-attention of the tokens of x [B, ..., width] (a grid [B, h, w, C]
    is flattened to [B, h*w, C] and restored); ``attention(q, kv)`` attends from the tokens of q
    to those of kv (the MAP head). The q/k/v/out kernels [width, width] are big_vision's
    [width, heads, head_dim] / [heads, head_dim, width] kernels reshaped.
    """

    def __init__(self, width: int, num_heads: int, *, dtype, implementation="auto",
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width = {width} must be divisible by num_heads = {num_heads}")
        self.width = width
        self.num_heads = num_heads
        self.dtype = dtype
        self.implementation = implementation
        self.query = _dense(width, width, dtype, rngs)
        self.key = _dense(width, width, dtype, rngs)
        self.value = _dense(width, width, dtype, rngs)
        self.out = _dense(width, width, dtype, rngs)

    def __call__(self, x: jax.Array, kv: jax.Array | None = None) -> jax.Array:
        kv = x if kv is None else kv
        for name, a in (("x", x), ("kv", kv)):
            if a.ndim < 3 or a.shape[-1] != self.width:
                raise ValueError(f"{name} must be tokens [B, ..., {self.width}], got shape "
                                 f"{tuple(a.shape)}")
        batch, head_dim = x.shape[0], self.width // self.num_heads
        heads = lambda t: t.reshape(batch, -1, self.num_heads, head_dim)  # [B, T, heads, dim]
        q = heads(self.query(x))
        k, v = heads(self.key(kv)), heads(self.value(kv))
        implementation = _choose_attention_implementation(self.implementation, q.dtype)
        if implementation == "cudnn":
            y = _cudnn_attention(q, k, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        return self.out(y.reshape(*x.shape[:-1], self.width))


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention for any token counts: its backward rejects odd sequence lengths
    (e.g. a 73 x 73 grid), so odd ones get one padding token that the seq-length mask hides."""
    t_len, s_len = q.shape[1], k.shape[1]
    if t_len % 2 == 0 and s_len % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    pad = lambda a: jnp.pad(a, ((0, 0), (0, a.shape[1] % 2), (0, 0), (0, 0)))
    batch = q.shape[0]
    y = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), implementation="cudnn",
        query_seq_lengths=jnp.full((batch,), t_len, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), s_len, jnp.int32))
    return y[:, :t_len]


class Block(nnx.Module):
    """A pre-LayerNorm residual block with any token mixer (attention or a GSPN mixer).

    On a token grid x [B, h, w, C]:
      mixer_out   = mixer(norm1(x))                   "the mixer sub-layer output"
      after_mixer = x + mixer_out                     the residual stream after the mixer
      after_block = after_mixer + mlp(norm2(after_mixer))
    The mixer maps [B, h, w, C] -> [B, h, w, C]; `mixer_sublayer(x)` computes mixer_out alone
    (stage-1 distillation feeds the teacher's block input x to the student's mixer).
    """

    def __init__(self, mixer: nnx.Module, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs,
                 layer_norm_eps: float = 1e-6):
        self.width = width
        self.norm1 = _layer_norm(width, dtype, rngs, layer_norm_eps)
        self.mixer = mixer
        self.norm2 = _layer_norm(width, dtype, rngs, layer_norm_eps)
        self.mlp = MLP(width, mlp_dim, dtype=dtype, rngs=rngs)

    def mixer_sublayer(self, x: jax.Array) -> jax.Array:
        """mixer(norm1(x)) for a block input x [B, h, w, C]."""
        check_grid(x, self.width)
        return self.mixer(self.norm1(x))

    def __call__(self, x: jax.Array, *, return_intermediates: bool = False):
        """x [B, h, w, C] -> after_block, or (after_block, {"mixer_out", "after_mixer"})."""
        mixer_out = self.mixer_sublayer(x)
        after_mixer = x + mixer_out
        after_block = after_mixer + self.mlp(self.norm2(after_mixer))
        if return_intermediates:
            return after_block, {"mixer_out": mixer_out, "after_mixer": after_mixer}
        return after_block


class MAPHead(nnx.Module):
    """SigLIP's multihead attention pooling: a learned probe attends to all tokens, then a
    residual MLP on the LayerNormed result. [B, h, w, C] -> [B, C]. Memory is O(tokens)."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs,
                 layer_norm_eps: float = 1e-6):
        self.width = width
        self.dtype = dtype
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width),
                                                                  jnp.float32))
        # One query token: XLA's attention is O(tokens) here, and cuDNN gains nothing.
        self.attention = Attention(width, num_heads, dtype=dtype, implementation="xla",
                                   rngs=rngs)
        self.norm = _layer_norm(width, dtype, rngs, layer_norm_eps)
        self.mlp = MLP(width, mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_grid(x, self.width)
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, self.width))
        pooled = self.attention(probe, x)                       # [B, 1, C]
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class GlobalAveragePool(nnx.Module):
    """Mean over the token grid: [B, h, w, C] -> [B, C]."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


def resize_grid(x: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize (no antialiasing) of token grids [B, h, w, C] to [B, *grid_hw, C]."""
    if tuple(x.shape[1:3]) == tuple(grid_hw):
        return x
    return jax.image.resize(x, (x.shape[0], *grid_hw, x.shape[-1]), method="bilinear",
                            antialias=False)


def resize_posemb(posemb: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of a position embedding [1, h, w, C] to the grid [1, *grid_hw, C]."""
    return resize_grid(posemb, grid_hw)


# ----------------------------------------------------------------------------- encoders


class VisionEncoder(nnx.Module):
    """The structure shared by `ViT` and `CGSPNEncoder`; subclasses choose each block's mixer.

    Attributes (for distillation and surgery): ``patch_embed``, ``pos_emb`` (an nnx.Param
    [1, h, w, C] or None), ``blocks`` (an nnx.List of `Block`), ``norm`` (final LayerNorm),
    ``head`` (`MAPHead` or `GlobalAveragePool`), ``config``.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        dtype, width = config.dtype, config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, width, dtype=dtype,
                                      rngs=rngs)
        if config.posemb == "learn":
            init = nnx.initializers.normal(stddev=width ** -0.5)
            self.pos_emb = nnx.Param(init(rngs.params(), (1, *config.grid_hw, width),
                                          jnp.float32))
        else:
            self.pos_emb = None
        self.blocks = nnx.List([
            Block(self.make_mixer(i, rngs), width, config.mlp_dim, dtype=dtype, rngs=rngs,
                  layer_norm_eps=config.layer_norm_eps)
            for i in range(config.depth)
        ])
        self.norm = _layer_norm(width, dtype, rngs, config.layer_norm_eps)
        if config.pool == "map":
            self.head = MAPHead(width, config.mlp_dim, config.num_heads, dtype=dtype, rngs=rngs,
                                layer_norm_eps=config.layer_norm_eps)
        else:
            self.head = GlobalAveragePool()

    def make_mixer(self, index: int, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def make_attention(self, rngs: nnx.Rngs) -> Attention:
        c = self.config
        return Attention(c.width, c.num_heads, dtype=c.dtype,
                         implementation=c.attention_implementation, rngs=rngs)

    def embed(self, images: jax.Array) -> jax.Array:
        """Normalised images [B, H, W, C_in] -> token grid [B, H/p, W/p, width] (+ pos_emb)."""
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"images must be floating point and already normalised, got "
                            f"{images.dtype} (cgspn_jax.encode takes uint8 images)")
        tokens = self.patch_embed(images.astype(self.config.dtype))
        if self.pos_emb is not None:
            posemb = resize_posemb(self.pos_emb[...], tokens.shape[1:3])
            tokens = tokens + posemb.astype(tokens.dtype)
        return tokens

    def features(self, images: jax.Array, *, return_intermediates: bool = False):
        """The final-LayerNormed token grid [B, h, w, width] before the head (dense features);
        with ``return_intermediates``, (features, intermediates) as in `__call__`."""
        x = self.embed(images)
        taps = {"block_input": [], "mixer_out": [], "after_mixer": [], "after_block": []}
        for block in self.blocks:
            if return_intermediates:
                taps["block_input"].append(x)
            if self.config.remat:
                x = nnx.remat(lambda blk, y: blk(y, return_intermediates=return_intermediates)
                              )(block, x)
            else:
                x = block(x, return_intermediates=return_intermediates)
            if return_intermediates:
                x, block_taps = x
                taps["mixer_out"].append(block_taps["mixer_out"])
                taps["after_mixer"].append(block_taps["after_mixer"])
                taps["after_block"].append(x)
        features = self.norm(x)
        if return_intermediates:
            return features, taps
        return features

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        """Normalised images [B, H, W, 3] (H, W multiples of the patch) -> embedding [B, width].

        With ``return_intermediates=True``: (embedding, intermediates), where intermediates is
        a dict of per-block lists of token grids [B, h, w, width], index i = block i:
          "block_input"  the block's input (the embedded tokens for block 0),
          "mixer_out"    mixer(norm1(block_input)), the mixer sub-layer output,
          "after_mixer"  block_input + mixer_out, the residual stream after the mixer,
          "after_block"  the block's output;
        and "features": the final-LayerNormed grid the head pools.
        Under jit, the taps a caller does not use cost nothing.
        """
        features = self.features(images, return_intermediates=return_intermediates)
        if return_intermediates:
            features, taps = features
            return self.head(features), {**taps, "features": features}
        return self.head(features)

    def num_params(self) -> int:
        return count_params(self)


class ViT(VisionEncoder):
    """SigLIP-style Vision Transformer: the distillation teacher.

    ``ViT("So400m/14", rngs=nnx.Rngs(0))``; overrides are any `ViTConfig` field, e.g.
    ``ViT("S/16", depth=6, image_size=256, pool="gap", dtype=jnp.bfloat16, rngs=...)``.
    Every block's mixer is an `Attention`.
    """

    def __init__(self, variant: str = "B/16", *, rngs: nnx.Rngs, **overrides):
        super().__init__(vit_config(variant, **overrides), rngs=rngs)

    def make_mixer(self, index: int, rngs: nnx.Rngs) -> nnx.Module:
        return self.make_attention(rngs)


def count_params(module: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract modules from nnx.eval_shape too)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
