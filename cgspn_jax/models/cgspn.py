"""The C-GSPN encoder, isomorphic to the ViT teacher, and the teacher -> student weight copy.

`CGSPNEncoder("So400m/14")` has the ViT's patch embedding, depth, width, MLPs, norms and head;
each block's attention is replaced by a `CGSPNMixer` (or `GSPNMixer` with mixer="gspn"), except
in the blocks listed in ``attention_blocks`` (a hybrid). No position embedding by default: the
2D scan knows where it is.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cgspn_jax.gspn import DIRECTIONS
from cgspn_jax.models.mixers import CGSPNMixer, GSPNMixer
from cgspn_jax.models.vit import ViTConfig, VisionEncoder, make_config


@dataclasses.dataclass(frozen=True)
class CGSPNConfig(ViTConfig):
    """A `ViTConfig` plus the token mixer's settings."""

    posemb: str = "none"
    mixer: str = "cgspn"             # "cgspn" (compressed latent scan) or "gspn" (full width)
    compression: int = 18            # cgspn: latent_dim = round(width / compression)
    latent_dim: int | None = None    # cgspn: overrides compression
    proxy_dim: int = 32              # gspn: the space that predicts lam, u and gates
    gate_groups: int | None = None   # None: one gate group per propagated channel
    directions: tuple[str, ...] = DIRECTIONS
    chunk: int | None = None         # restart the scan every `chunk` lines (local GSPN)
    scan_backend: str = "auto"       # gspn_scan backend
    attention_blocks: tuple[int, ...] = ()   # blocks that keep attention (hybrid)

    def validate(self) -> None:
        super().validate()
        if self.mixer not in ("cgspn", "gspn"):
            raise ValueError(f"mixer must be 'cgspn' or 'gspn', got {self.mixer!r}")
        for i in self.attention_blocks:
            if isinstance(i, bool) or not isinstance(i, int) or not -self.depth <= i < self.depth:
                raise ValueError(f"attention_blocks must hold block indices in "
                                 f"[-{self.depth}, {self.depth}), got {self.attention_blocks!r}")

    @property
    def attention_block_set(self) -> frozenset[int]:
        return frozenset(i % self.depth for i in self.attention_blocks)


def cgspn_config(variant: str = "B/16", **overrides) -> CGSPNConfig:
    """The `CGSPNConfig` of a variant name with overrides."""
    for name in ("directions", "attention_blocks"):
        if name in overrides and not isinstance(overrides[name], str):
            overrides[name] = tuple(overrides[name])
    return make_config(CGSPNConfig, variant, overrides)


class CGSPNEncoder(VisionEncoder):
    """C-GSPN vision encoder, isomorphic to `ViT` of the same variant.

    ``CGSPNEncoder("So400m/14", rngs=nnx.Rngs(0))``; overrides are any `CGSPNConfig` field, e.g.
    ``compression=12``, ``attention_blocks=(-1,)``, ``posemb="learn"``, ``dtype=jnp.bfloat16``.
    Calls and intermediates as `ViT` (see `VisionEncoder.__call__`).
    """

    def __init__(self, variant: str = "B/16", *, rngs: nnx.Rngs, **overrides):
        super().__init__(cgspn_config(variant, **overrides), rngs=rngs)

    def make_mixer(self, index: int, rngs: nnx.Rngs) -> nnx.Module:
        c = self.config
        if index in c.attention_block_set:
            return self.make_attention(rngs)
        scan = dict(gate_groups=c.gate_groups, directions=c.directions, chunk=c.chunk,
                    backend=c.scan_backend, dtype=c.dtype, rngs=rngs)
        if c.mixer == "gspn":
            return GSPNMixer(c.width, proxy_dim=c.proxy_dim, **scan)
        return CGSPNMixer(c.width, compression=c.compression, latent_dim=c.latent_dim, **scan)


def _copy_params(source: nnx.Module, target: nnx.Module, where: str) -> None:
    """target's parameters <- copies of source's; ValueError if the two differ in structure."""
    src, dst = nnx.state(source, nnx.Param), nnx.state(target, nnx.Param)
    src_shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(src)}
    dst_shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(dst)}
    if src_shapes != dst_shapes:
        raise ValueError(f"init_student_from_teacher: {where} differs between teacher and "
                         f"student: {src_shapes} vs {dst_shapes}")
    # Copies, not shared buffers: a training step that donates the student's state must not
    # delete the teacher's weights.
    nnx.update(target, jax.tree.map(jnp.copy, src))


def init_student_from_teacher(teacher: VisionEncoder, student: VisionEncoder) -> VisionEncoder:
    """Copies, in place, what a `ViT` and a `CGSPNEncoder` of the same shape share: the patch
    embedding, the position embedding (when both have one), each block's norm1, norm2 and MLP,
    the attention of hybrid blocks that kept it, the final norm and the head. The C-GSPN mixers
    are left as they are. Returns the student.
    """
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, VisionEncoder):
            raise TypeError(f"{name} must be a ViT or CGSPNEncoder, got {type(model).__name__}")
    t, s = teacher.config, student.config
    shape_fields = ("width", "depth", "mlp_dim", "patch_size", "in_channels", "pool")
    mismatched = {f: (getattr(t, f), getattr(s, f)) for f in shape_fields
                  if getattr(t, f) != getattr(s, f)}
    # Attention weights mean something only for the head count they were trained with: the MAP
    # head's, and the attention of hybrid blocks.
    if (s.pool == "map" or s.attention_block_set) and t.num_heads != s.num_heads:
        mismatched["num_heads"] = (t.num_heads, s.num_heads)
    if mismatched:
        raise ValueError(f"init_student_from_teacher: teacher and student must have the same "
                         f"shape; differing (teacher, student): {mismatched}")

    pairs = [("patch_embed", teacher.patch_embed, student.patch_embed),
             ("norm", teacher.norm, student.norm), ("head", teacher.head, student.head)]
    if teacher.pos_emb is not None and student.pos_emb is not None:
        if teacher.pos_emb.shape != student.pos_emb.shape:
            raise ValueError(f"init_student_from_teacher: pos_emb shapes differ: "
                             f"{teacher.pos_emb.shape} vs {student.pos_emb.shape}")
        student.pos_emb[...] = jnp.copy(teacher.pos_emb[...])
    for i, (tb, sb) in enumerate(zip(teacher.blocks, student.blocks)):
        pairs += [(f"blocks[{i}].norm1", tb.norm1, sb.norm1),
                  (f"blocks[{i}].norm2", tb.norm2, sb.norm2),
                  (f"blocks[{i}].mlp", tb.mlp, sb.mlp)]
        if type(tb.mixer) is type(sb.mixer):  # a hybrid block that kept attention
            pairs.append((f"blocks[{i}].mixer", tb.mixer, sb.mixer))
    for where, source, target in pairs:
        _copy_params(source, target, where)
    return student
