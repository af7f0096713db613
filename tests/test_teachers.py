"""load_teacher / save_teacher: our ViT must compute what the original checkpoints compute.

Hugging Face: tiny random SigLIP models built by `transformers` on the CPU (weights perturbed so
that biases and norms are not at their init), saved, loaded, and compared on random pixels.
big_vision: a checkpoint written here with big_vision's names and layouts from a known ViT.
Needs the `interop` extra (torch, transformers) for the Hugging Face part.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cgspn_jax import ViT
from cgspn_jax.teachers import load_teacher, save_teacher

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RNG = np.random.default_rng(12345)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def perturb(model, scale=0.05):
    torch.manual_seed(int(RNG.integers(1 << 30)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, layer_norm_eps=1e-5)


def compare_with_torch(vision_model, teacher, image_size=32):
    pixels = RNG.normal(size=(3, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        out = vision_model(pixel_values=torch.from_numpy(pixels))
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    pooled, taps = teacher(images, return_intermediates=True)
    features = taps["features"].reshape(pixels.shape[0], -1, teacher.config.width)
    assert rel_err(pooled, out.pooler_output.numpy()) < 1e-4
    assert rel_err(features, out.last_hidden_state.numpy()) < 1e-4


@pytest.mark.parametrize("shard", [False, True])
def test_hugging_face_vision_model(tmp_path, shard):
    config = transformers.SiglipVisionConfig(**VISION)
    model = perturb(transformers.SiglipVisionModel(config))
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    teacher = load_teacher(tmp_path)
    c = teacher.config
    assert (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size) == (48, 2, 80, 4, 8)
    compare_with_torch(model, teacher)


def test_hugging_face_image_text_model_takes_the_vision_tower(tmp_path):
    text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, max_position_embeddings=8)
    config = transformers.SiglipConfig(text_config=text, vision_config=VISION)
    model = perturb(transformers.SiglipModel(config))
    model.save_pretrained(tmp_path)
    compare_with_torch(model.vision_model, load_teacher(tmp_path))


def test_hugging_face_errors_list_the_offending_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    p = "vision_model." if "vision_model.post_layernorm.weight" in tensors else ""
    dropped = p + "encoder.layers.1.mlp.fc2.bias"
    del tensors[dropped]
    tensors[p + "extra.weight"] = np.ones(3, np.float32)
    tensors[p + "post_layernorm.weight"] = np.ones(7, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors") as info:
        load_teacher(tmp_path)
    assert dropped in str(info.value) and p + "extra.weight" in str(info.value)
    del tensors[p + "extra.weight"]
    tensors[dropped] = np.ones(48, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="mis-shaped.*post_layernorm"):
        load_teacher(tmp_path)


# ----------------------------------------------------------------------------- big_vision


def random_vit(**overrides):
    """A ViT whose every parameter is random (biases and norms too)."""
    model = ViT("mu/8", image_size=32, rngs=nnx.Rngs(int(RNG.integers(1000))), **overrides)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: p + 0.05 * RNG.normal(size=p.shape).astype(np.float32), params)
    return nnx.merge(graphdef, params, rest)


def big_vision_arrays(model, prefix="params/img/", scanned=False):
    """Our ViT's parameters under big_vision's names and layouts (written independently of the
    loader's rules: heads split out of the [C, C] kernels, biases as [heads, head_dim])."""
    c = model.config
    heads, head_dim = c.num_heads, c.width // c.num_heads
    arr = lambda v: np.asarray(v[...])
    out = {f"{prefix}embedding/kernel": arr(model.patch_embed.conv.kernel),
           f"{prefix}embedding/bias": arr(model.patch_embed.conv.bias),
           f"{prefix}pos_embedding": arr(model.pos_emb).reshape(1, -1, c.width),
           f"{prefix}Transformer/encoder_norm/scale": arr(model.norm.scale),
           f"{prefix}Transformer/encoder_norm/bias": arr(model.norm.bias)}

    def attention(module, base):
        for name in ("query", "key", "value"):
            layer = getattr(module, name)
            out[f"{base}{name}/kernel"] = arr(layer.kernel).reshape(c.width, heads, head_dim)
            out[f"{base}{name}/bias"] = arr(layer.bias).reshape(heads, head_dim)
        out[f"{base}out/kernel"] = arr(module.out.kernel).reshape(heads, head_dim, c.width)
        out[f"{base}out/bias"] = arr(module.out.bias)

    def mlp(module, base):
        out[f"{base}Dense_0/kernel"], out[f"{base}Dense_0/bias"] = arr(module.fc1.kernel), arr(module.fc1.bias)
        out[f"{base}Dense_1/kernel"], out[f"{base}Dense_1/bias"] = arr(module.fc2.kernel), arr(module.fc2.bias)

    for i, block in enumerate(model.blocks):
        base = f"{prefix}Transformer/encoderblock_{i}/"
        for ln, norm in (("LayerNorm_0", block.norm1), ("LayerNorm_1", block.norm2)):
            out[f"{base}{ln}/scale"], out[f"{base}{ln}/bias"] = arr(norm.scale), arr(norm.bias)
        attention(block.mixer, f"{base}MultiHeadDotProductAttention_0/")
        mlp(block.mlp, f"{base}MlpBlock_0/")
    head = f"{prefix}MAPHead_0/"
    out[f"{head}probe"] = arr(model.head.probe)
    attention(model.head.attention, f"{head}MultiHeadDotProductAttention_0/")
    out[f"{head}LayerNorm_0/scale"], out[f"{head}LayerNorm_0/bias"] = arr(model.head.norm.scale), arr(model.head.norm.bias)
    mlp(model.head.mlp, f"{head}MlpBlock_0/")
    if scanned:  # big_vision's scan=True layout: one stack per block tensor
        stacked = f"{prefix}Transformer/encoderblock/"
        per_block = [k for k in out if "/encoderblock_" in k]
        names = sorted({k.split("/encoderblock_")[1].split("/", 1)[1] for k in per_block})
        for name in names:
            out[stacked + name] = np.stack([out.pop(f"{prefix}Transformer/encoderblock_{i}/{name}")
                                            for i in range(c.depth)])
    return out


@pytest.mark.parametrize("prefix,scanned", [("params/img/", False), ("", False), ("params/img/", True)])
def test_big_vision_round_trip(tmp_path, prefix, scanned):
    model = random_vit(depth=2)
    arrays = big_vision_arrays(model, prefix, scanned)
    if prefix:  # a SigLIP two-tower file: the text tower and logit scale/bias are ignored
        arrays.update({"params/txt/Embed_0/embedding": np.ones((5, 4), np.float32),
                       "params/t": np.ones(1, np.float32), "params/b": np.ones(1, np.float32)})
    np.savez(tmp_path / "bv.npz", **arrays)
    teacher = load_teacher(tmp_path / "bv.npz")
    images = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(teacher, nnx.Param))):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(teacher(images), model(images), rtol=1e-6, atol=1e-6)


def test_big_vision_errors(tmp_path):
    arrays = big_vision_arrays(random_vit())
    arrays.pop("params/img/MAPHead_0/LayerNorm_0/bias")
    arrays["params/img/Transformer/encoder_norm/scale"] = np.ones(5, np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="MAPHead_0/LayerNorm_0/bias"):
        load_teacher(tmp_path / "bad.npz")
    np.savez(tmp_path / "junk.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a big_vision"):
        load_teacher(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- native format


def test_save_and_load_teacher_round_trip(tmp_path):
    model = random_vit(pool="map", depth=2)
    target = tmp_path / "teacher"
    save_teacher(model, target)
    loaded = load_teacher(target)
    images = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
    np.testing.assert_array_equal(loaded(images), model(images))
    assert loaded.config == model.config
    remat = load_teacher(target, remat=True)  # fields that keep the shapes may be overridden
    assert remat.config.remat and remat.config.width == model.config.width
    with pytest.raises(ValueError, match="would change the parameter shapes"):
        load_teacher(target, width=64)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_teacher(model, target)
    other = random_vit(depth=2)
    save_teacher(other, target, overwrite=True)
    np.testing.assert_array_equal(load_teacher(target)(images), other(images))


def test_load_teacher_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no teacher checkpoint"):
        load_teacher(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        load_teacher(tmp_path / "empty")
