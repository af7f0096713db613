"""Flax NNX models: ViT teacher, GSPN / C-GSPN mixers and encoder, weight copy, encode (CPU)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cgspn_jax
from cgspn_jax.models import (CGSPNEncoder, CGSPNMixer, GSPNMixer, ViT, count_params,
                              decode_variant, encode, init_student_from_teacher)
from cgspn_jax.models import inference, vit_config

# float32 matmuls run as TF32 on a GPU unless told otherwise; these tests are for the CPU, where
# the same computation in another batch shape agrees to float32 rounding.
ON_CPU = jax.default_backend() == "cpu"
TOL = dict(rtol=1e-4, atol=1e-5) if ON_CPU else dict(rtol=2e-2, atol=2e-2)
GRAD_TOL = dict(rtol=1e-3, atol=1e-6) if ON_CPU else TOL

# So400m/14 has its own test below, with the paper's targets.
VARIANTS = ["mu/16", "Ti/16", "S/16", "B/16", "L/16"]
def small_vit(seed=0, **overrides):
    """A toy size that compiles in seconds: width 32, 2 heads, MLP 128, patch 8, depth 2."""
    overrides.setdefault("depth", 2)
    return ViT("mu/8", rngs=nnx.Rngs(seed), **overrides)


def small_cgspn(seed=0, **overrides):
    overrides.setdefault("depth", 2)
    overrides.setdefault("latent_dim", 8)
    return CGSPNEncoder("mu/8", rngs=nnx.Rngs(seed), **overrides)


def images(seed, batch=2, height=32, width=48, channels=3):
    return jax.random.normal(jax.random.key(seed), (batch, height, width, channels))


@nnx.jit
def embed(model, x):
    return model(x)


@nnx.jit
def embed_and_features(model, x):
    return model(x), model.features(x)


def vit_param_count(width, depth, mlp_dim, patch, grid, channels=3):
    """Parameters of a SigLIP ViT with MAP head, counted by hand."""
    attention = 4 * (width * width + width)
    mlp = 2 * width * mlp_dim + mlp_dim + width
    layer_norm = 2 * width
    block = 2 * layer_norm + attention + mlp
    head = width + attention + layer_norm + mlp
    stem = patch * patch * channels * width + width + grid * grid * width
    return stem + depth * block + layer_norm + head


# ----------------------------------------------------------------------------- shapes and counts


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts_every_variant(variant):
    teacher = nnx.eval_shape(lambda: ViT(variant, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: CGSPNEncoder(variant, rngs=nnx.Rngs(0)))
    cfg = decode_variant(variant)
    grid = 224 // cfg["patch_size"]
    assert count_params(teacher) == vit_param_count(cfg["width"], cfg["depth"], cfg["mlp_dim"],
                                                     cfg["patch_size"], grid)
    n_teacher, n_student = count_params(teacher), count_params(student)
    print(f"{variant}: ViT {n_teacher:,} params, CGSPNEncoder {n_student:,} params "
          f"({1 - n_student / n_teacher:.1%} fewer)")
    assert n_student < n_teacher
    # Every block keeps its MLP and norms, only the mixer differs.
    assert len(student.blocks) == len(teacher.blocks) == cfg["depth"]
    assert student.pos_emb is None and teacher.pos_emb.shape == (1, grid, grid, cfg["width"])


def test_so400m_counts():
    teacher = nnx.eval_shape(lambda: ViT("So400m/14", rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: CGSPNEncoder("So400m/14", rngs=nnx.Rngs(0)))
    n_teacher, n_student = count_params(teacher), count_params(student)
    assert n_teacher == vit_param_count(1152, 27, 4304, 14, 16)
    print(f"\nViT('So400m/14'): {n_teacher:,} parameters")
    print(f"CGSPNEncoder('So400m/14'): {n_student:,} parameters "
          f"({1 - n_student / n_teacher:.1%} fewer; latent {student.blocks[0].mixer.latent_dim})")
    assert 427e6 < n_teacher < 429e6          # the public SigLIP So400m/14 with its MAP head
    assert n_student <= 0.85 * n_teacher      # C-GSPN target: at least 15% fewer
    assert student.blocks[0].mixer.latent_dim == 64   # 1152 / 18


def test_variant_decoding_and_overrides():
    assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16,
                                               patch_size=14)
    model = nnx.eval_shape(lambda: CGSPNEncoder("B/16", depth=3, patch_size=8, image_size=64,
                                                compression=12, attention_blocks=[-1],
                                                rngs=nnx.Rngs(0)))
    assert model.config.depth == 3 and model.config.patch_size == 8
    assert model.blocks[0].mixer.latent_dim == 64 and isinstance(model.blocks[0].mixer,
                                                                 CGSPNMixer)
    assert isinstance(model.blocks[2].mixer, cgspn_jax.models.Attention)
    gspn = nnx.eval_shape(lambda: CGSPNEncoder("Ti/16", mixer="gspn", rngs=nnx.Rngs(0)))
    assert isinstance(gspn.blocks[0].mixer, GSPNMixer)
    with pytest.raises(ValueError, match="unknown size"):
        ViT("Q/16", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unknown override"):
        ViT("Ti/16", widht=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_blocks"):
        CGSPNEncoder("Ti/16", attention_blocks=(12,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        ViT("Ti/16", num_heads=5, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("make", [
    small_vit,
    small_cgspn,
    lambda: small_cgspn(mixer="gspn", proxy_dim=4, gate_groups=4, pool="gap"),
], ids=["vit", "cgspn", "gspn_gap"])
def test_forward_two_resolutions(make):
    model = make()
    for seed, (h, w) in enumerate([(32, 32), (48, 72)]):
        emb, features = embed_and_features(model, images(seed, height=h, width=w))
        assert emb.shape == (2, 32) and emb.dtype == jnp.float32
        assert np.all(np.isfinite(emb))
        assert features.shape == (2, h // 8, w // 8, 32)


def test_bfloat16_computation_keeps_float32_params():
    model = small_cgspn(dtype=jnp.bfloat16, attention_blocks=(0,))
    emb = embed(model, images(3))
    assert emb.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(emb)))
    dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    reference = embed(small_cgspn(attention_blocks=(0,)), images(3))
    np.testing.assert_allclose(np.float32(emb), reference, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("make", [small_vit, lambda: small_cgspn(attention_blocks=(1,))],
                         ids=["vit", "hybrid_cgspn"])
def test_return_intermediates_consistent(make):
    model = make()
    x = images(4, height=40, width=24)

    @nnx.jit
    def run(model, x):
        emb, taps = model(x, return_intermediates=True)
        # Recomputed separately, from the taps: what distillation will feed in.
        again = dict(
            emb=model(x), features=model.features(x), embedded=model.embed(x),
            mixer_out=[b.mixer_sublayer(t) for b, t in zip(model.blocks, taps["block_input"])],
            after_block=[b(t) for b, t in zip(model.blocks, taps["block_input"])],
            normed=model.norm(taps["after_block"][-1]))
        return emb, taps, again

    emb, taps, again = run(model, x)
    close = lambda a, b: np.testing.assert_allclose(a, b, **TOL)
    close(emb, again["emb"])
    close(taps["features"], again["features"])
    close(taps["features"], again["normed"])
    close(taps["block_input"][0], again["embedded"])
    assert all(len(taps[k]) == len(model.blocks) for k in
               ("block_input", "mixer_out", "after_mixer", "after_block"))
    for i in range(len(model.blocks)):
        assert taps["block_input"][i].shape == (2, 5, 3, 32)
        close(taps["mixer_out"][i], again["mixer_out"][i])
        close(taps["after_mixer"][i], taps["block_input"][i] + taps["mixer_out"][i])
        close(taps["after_block"][i], again["after_block"][i])
        if i + 1 < len(model.blocks):
            np.testing.assert_array_equal(taps["block_input"][i + 1], taps["after_block"][i])


def test_mixers_standalone():
    x = images(5, height=6, width=7, channels=36)
    cgspn = CGSPNMixer(36, compression=6, gate_groups=2, chunk=3, directions=("lr", "tb"),
                       rngs=nnx.Rngs(0))
    gspn = GSPNMixer(36, proxy_dim=4, gate_groups=1, rngs=nnx.Rngs(1))
    assert cgspn.latent_dim == 6
    outputs = nnx.jit(lambda a, b, x: (a(x), b(x)))(cgspn, gspn, x)
    assert outputs[0].shape == outputs[1].shape == x.shape
    with pytest.raises(ValueError, match="token grid"):
        cgspn(x[..., :35])
    with pytest.raises(ValueError, match="gate_groups"):
        CGSPNMixer(36, latent_dim=6, gate_groups=4, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- gradients


def _grads(model, x, seed):
    target = jax.random.normal(jax.random.key(seed), (x.shape[0], model.config.width))

    def loss(m):
        emb, taps = m(x, return_intermediates=True)
        return jnp.sum(emb * target) + 1e-3 * jnp.sum(taps["features"] ** 2)

    return nnx.jit(nnx.grad(loss))(model)


@pytest.mark.parametrize("make", [
    lambda: small_vit(),
    lambda: small_cgspn(posemb="learn", attention_blocks=(0,)),
    lambda: small_cgspn(mixer="gspn", proxy_dim=4, remat=True),
], ids=["vit", "hybrid_cgspn_posemb", "gspn_remat"])
def test_gradients_reach_every_parameter(make):
    model = make()
    grads = nnx.to_flat_state(_grads(model, images(6), seed=7))
    checked = 0
    for path, g in grads:
        name = "/".join(map(str, path))
        # Softmax ignores a shift common to all keys, and the key bias adds q . b_key to every
        # logit of a query alike: its gradient is zero in exact arithmetic.
        if "key/bias" in name:
            continue
        assert float(jnp.max(jnp.abs(g[...]))) > 0, f"no gradient reaches {name}"
        checked += 1
    assert checked > 20


def test_jit_and_grad_whole_encoder_auto_backend():
    x = images(10, height=40, width=56)
    target = jax.random.normal(jax.random.key(11), (2, 32))

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)

    auto_loss, auto_grads = loss_and_grads(small_cgspn(scan_backend="auto"))
    ref_loss, ref_grads = loss_and_grads(small_cgspn(scan_backend="reference"))
    np.testing.assert_allclose(auto_loss, ref_loss, **GRAD_TOL)
    for (path, a), (_, b) in zip(nnx.to_flat_state(auto_grads), nnx.to_flat_state(ref_grads)):
        np.testing.assert_allclose(a[...], b[...], **GRAD_TOL, err_msg=str(path))


def test_cgspn_memory_is_linear_in_tokens():
    """Compiled temp memory of forward + backward grows like the token count, not its square."""
    def temp_bytes(side):
        model = CGSPNEncoder("mu/8", depth=1, latent_dim=8, scan_backend="reference",
                             rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x))
        compiled = jax.jit(jax.grad(loss)).lower(state, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(128), temp_bytes(256)  # 256 and 1024 tokens
    # 4x the tokens: quadratic memory would grow 16x.
    assert large < 6 * small, (small, large)


# ----------------------------------------------------------------------------- teacher -> student


def test_init_student_from_teacher_copies_shared_parts():
    teacher = small_vit(seed=1)
    student = small_cgspn(seed=2, posemb="learn", attention_blocks=(1,))
    mixer_before = jax.tree.map(jnp.copy, nnx.state(student.blocks[0].mixer, nnx.Param))
    assert init_student_from_teacher(teacher, student) is student

    def assert_same(a, b):
        flat_a, flat_b = nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(
            nnx.state(b, nnx.Param))
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        for (_, va), (_, vb) in zip(flat_a, flat_b):
            np.testing.assert_array_equal(va[...], vb[...])
            assert va[...] is not vb[...]  # copies: donating one must not delete the other

    for name in ("patch_embed", "norm", "head"):
        assert_same(getattr(teacher, name), getattr(student, name))
    np.testing.assert_array_equal(teacher.pos_emb[...], student.pos_emb[...])
    for tb, sb in zip(teacher.blocks, student.blocks):
        for name in ("norm1", "norm2", "mlp"):
            assert_same(getattr(tb, name), getattr(sb, name))
    assert_same(teacher.blocks[1].mixer, student.blocks[1].mixer)  # the hybrid's attention
    mixer_after = nnx.state(student.blocks[0].mixer, nnx.Param)
    for (_, a), (_, b) in zip(nnx.to_flat_state(mixer_before), nnx.to_flat_state(mixer_after)):
        np.testing.assert_array_equal(a[...], b[...])
    # A student whose mixers were identity would now reproduce the teacher's MLP path; here it
    # just has to run.
    assert np.all(np.isfinite(embed(student, images(12))))


def test_init_student_from_teacher_rejects_other_shapes():
    with pytest.raises(ValueError, match="mlp_dim"):
        init_student_from_teacher(small_vit(), small_cgspn(mlp_dim=64))
    with pytest.raises(TypeError, match="teacher"):
        init_student_from_teacher(object(), small_cgspn())


# ----------------------------------------------------------------------------- encode and errors


def test_encode_uint8_batches_and_compiles_once():
    model = small_cgspn()
    rng = np.random.default_rng(13)
    pixels = rng.integers(0, 256, size=(5, 32, 40, 3), dtype=np.uint8)
    before = inference.trace_count
    out = encode(model, pixels, batch_size=2)
    assert inference.trace_count == before + 1   # 3 batches (last padded), one compilation
    assert isinstance(out, np.ndarray) and out.shape == (5, 32) and out.dtype == np.float32
    normalised = (pixels.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out, embed(model, jnp.asarray(normalised)), **TOL)
    # The same shape again: no new compilation; one image: one embedding.
    encode(model, pixels[:4], batch_size=2)
    assert inference.trace_count == before + 1
    np.testing.assert_allclose(encode(model, pixels[3], output="jax"), out[3], **TOL)
    floats = encode(model, pixels.astype(np.float32) / 255, batch_size=8)
    np.testing.assert_allclose(floats, out, **TOL)
    resized = encode(model, pixels, resize_to=24, features=True)
    assert resized.shape == (5, 3, 3, 32)


def test_bad_images_raise_clear_errors():
    model = small_cgspn()
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(images(14, height=30, width=32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model(images(15, channels=4))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        small_vit()(images(16)[0])
    pixels = np.random.default_rng(17).integers(0, 256, size=(2, 36, 32, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        model(jnp.asarray(pixels[:, :32]))
    with pytest.raises(ValueError, match="multiples of the patch"):
        encode(model, pixels)
    with pytest.raises(ValueError, match="images must have shape"):
        encode(model, pixels[..., :2])
    with pytest.raises(ValueError, match="token grid"):
        model.blocks[0].mixer_sublayer(images(18))
    with pytest.raises(ValueError, match="at least one image"):
        encode(model, pixels[:0])


def test_config_values_are_checked_and_normalised():
    for bad in (224.0, (224.5, 224), (0, 224), "224"):
        with pytest.raises(ValueError, match="image_size"):
            vit_config("mu/8", image_size=bad)
    # numpy integers and JSON lists (a config read back from a file) are accepted as such.
    config = vit_config("mu/8", width=np.int64(32), image_size=[np.int64(32), 16],
                        pixel_mean=[0.5, 0.5, 0.5])
    assert config.width == 32 and type(config.width) is int
    assert config.image_size == (32, 16) and config.pixel_mean == (0.5, 0.5, 0.5)
    hash(config)  # a jit static


def test_hybrid_students_need_the_teachers_head_count():
    teacher = small_vit(pool="gap")
    student = small_cgspn(pool="gap", num_heads=4, attention_blocks=(0,))
    with pytest.raises(ValueError, match="num_heads"):
        init_student_from_teacher(teacher, student)


def test_exports():
    for name in ("ViT", "GSPNMixer", "CGSPNMixer", "CGSPNEncoder", "init_student_from_teacher",
                 "encode", "decode_variant"):
        assert name in cgspn_jax.__all__ and hasattr(cgspn_jax, name)
    assert math.isclose(count_params(small_vit()), vit_param_count(32, 2, 128, 8, 28))


@pytest.mark.gpu
def test_cudnn_attention_on_gpu_any_token_count():
    """bf16 attention runs cuDNN flash attention on a GPU (O(tokens) memory), forward and
    backward, also for odd token counts (a 9 x 9 grid), and agrees with XLA's attention."""
    from cgspn_jax.models.vit import _cudnn_attention
    keys = jax.random.split(jax.random.key(19), 4)
    q, k, v = (jax.random.normal(key, (2, 81, 4, 64), jnp.bfloat16) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)

    def loss_and_grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    (cudnn_loss, cudnn_grads), (xla_loss, xla_grads) = map(loss_and_grads,
                                                           (_cudnn_attention, xla))
    np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=2e-2)
    for a, b in zip(cudnn_grads, xla_grads):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=2e-2 * scale)
    model = small_vit(dtype=jnp.bfloat16, num_heads=1, width=64)
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images(20)).as_text()
    assert "cudnn" in hlo.lower()
