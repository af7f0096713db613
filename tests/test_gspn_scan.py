"""gspn_scan against the float64 loop oracle, the reference, finite differences; transforms,
sharding, determinism and input validation. CPU; runs in CI."""
import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import cgspn_jax
from cgspn_jax import gspn_scan
from oracle import gspn_scan_numpy

HAS_FFI = cgspn_jax.build_info()["cpu_kernel"]
BACKENDS = ["reference", "ffi"] if HAS_FFI else ["reference"]
ALL = ("tb", "bt", "lr", "rl")
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")

_seed = itertools.count(1)


def random_inputs(B, H, W, C, G, directions, dtype=jnp.float32, normalize=True):
    """Fresh random inputs for every call (a new seed each time)."""
    rng = np.random.default_rng(next(_seed))
    D = len(directions)
    x = rng.normal(size=(B, H, W, C))
    lam = rng.uniform(0.2, 1.2, size=(D, B, H, W, C))
    # Raw (unnormalised) gates stay small so the recurrence stays stable.
    w = rng.normal(size=(D, B, H, W, G, 3)) * (1.5 if normalize else 0.4)
    return tuple(jnp.asarray(a, dtype) for a in (x, lam, w))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def as64(*arrays):
    return tuple(np.asarray(a, np.float64) for a in arrays)


# (B, H, W, C, G): H != W, odd sizes, H or W = 1, G in {1, a divisor, C}
SHAPES = [
    (2, 5, 7, 6, 3),
    (1, 7, 4, 5, 5),
    (3, 1, 6, 4, 1),
    (2, 6, 1, 4, 2),
    (1, 1, 1, 3, 1),
    (2, 4, 9, 8, 1),
]
DIRECTION_SETS = [("tb",), ("bt",), ("lr",), ("rl",), ALL, ("rl", "tb", "lr", "bt"), ("lr", "bt")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("directions", DIRECTION_SETS)
def test_forward_matches_loop_oracle(backend, shape, directions):
    for chunk, normalize in [(None, True), (2, True), (None, False), (3, False)]:
        x, lam, w = random_inputs(*shape, directions, normalize=normalize)
        h = gspn_scan(x, lam, w, directions=directions, chunk=chunk, normalize=normalize,
                      backend=backend)
        expect = gspn_scan_numpy(*as64(x, lam, w), directions, chunk, normalize)
        assert h.shape == expect.shape and h.dtype == jnp.float32
        assert rel_err(h, expect) < 2e-6, (chunk, normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 3e-3)])
def test_low_precision_forward(backend, dtype, tol):
    directions = ("lr", "tb", "bt")
    x, lam, w = random_inputs(2, 6, 9, 8, 4, directions, dtype)
    h = gspn_scan(x, lam, w, directions=directions, chunk=4, backend=backend)
    assert h.dtype == dtype
    # The oracle sees the same rounded inputs, so only the output rounding and the float32
    # arithmetic differ.
    assert rel_err(h, gspn_scan_numpy(*as64(x, lam, w), directions, 4, True)) < tol


def loss_fn(backend, **kw):
    """A loss with a non-trivial cotangent for every output element."""
    def loss(x, lam, w):
        h = gspn_scan(x, lam, w, backend=backend, **kw).astype(jnp.float32)
        return jnp.sum(jnp.sin(h) * jnp.linspace(0.5, 1.5, h.size).reshape(h.shape))
    return loss


@pytest.mark.skipif(not HAS_FFI, reason="CPU kernel not built")
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("chunk,normalize", [(None, True), (2, True), (None, False)])
def test_ffi_gradients_match_reference_autodiff(shape, chunk, normalize):
    directions = ("bt", "lr", "tb", "rl")
    args = random_inputs(*shape, directions, normalize=normalize)
    kw = dict(directions=directions, chunk=chunk, normalize=normalize)
    got = jax.grad(loss_fn("ffi", **kw), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss_fn("reference", **kw), argnums=(0, 1, 2))(*args)
    # atol on the scale of all gradients: where a line holds one position its only weight is
    # exactly 1, so the kernel's dw is exactly 0 while autodiff of s / s leaves rounding noise.
    scale = max(float(jnp.abs(r).max()) for r in want)
    for name, g, r in zip(("dx", "dlam", "dw"), got, want):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * scale, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 8, 9, 1000, 2**31 - 1, 2**31, 2**40])
def test_chunks_around_line_counts(backend, chunk):
    """Chunks below, at and past the scans' line counts (5 lines top to bottom, 8 left to right),
    up to and past 32 bits: the forward against the loop oracle, and the kernel's gradients
    against autodiff of the reference."""
    directions = ALL
    x, lam, w = random_inputs(2, 5, 8, 6, 3, directions)
    h = gspn_scan(x, lam, w, directions=directions, chunk=chunk, backend=backend)
    assert rel_err(h, gspn_scan_numpy(*as64(x, lam, w), directions, chunk, True)) < 2e-6
    if backend == "reference":
        return  # its gradients are the reference's own
    kw = dict(directions=directions, chunk=chunk)
    got = jax.grad(loss_fn(backend, **kw), argnums=(0, 1, 2))(x, lam, w)
    want = jax.grad(loss_fn("reference", **kw), argnums=(0, 1, 2))(x, lam, w)
    for name, g, r in zip(("dx", "dlam", "dw"), got, want):
        assert rel_err(g, r) < 2e-5, name


@pytest.mark.skipif(not HAS_FFI, reason="CPU kernel not built")
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_ffi_low_precision_gradients(dtype, tol):
    directions = ("tb", "rl")
    args = random_inputs(2, 5, 6, 8, 2, directions, dtype)
    got = jax.grad(loss_fn("ffi", directions=directions), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss_fn("reference", directions=directions), argnums=(0, 1, 2))(
        *(a.astype(jnp.float32) for a in args))
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert rel_err(g, r) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_match_finite_differences(backend, normalize):
    """Central differences in float64 through the oracle, along random directions."""
    directions, chunk = ("tb", "rl", "bt"), 3
    x, lam, w = random_inputs(2, 4, 5, 4, 2, directions, normalize=normalize)
    kw = dict(directions=directions, chunk=chunk, normalize=normalize)
    grads = jax.grad(loss_fn(backend, **kw), argnums=(0, 1, 2))(x, lam, w)
    weights = np.linspace(0.5, 1.5, lam.size).reshape(lam.shape)
    oracle_loss = lambda *a: np.sum(np.sin(gspn_scan_numpy(*a, directions, chunk, normalize)) * weights)
    rng = np.random.default_rng(next(_seed))
    base = list(as64(x, lam, w))
    for i, g in enumerate(grads):
        v = rng.normal(size=base[i].shape)
        eps = 1e-5
        plus, minus = list(base), list(base)
        plus[i] = base[i] + eps * v
        minus[i] = base[i] - eps * v
        fd = (oracle_loss(*plus) - oracle_loss(*minus)) / (2 * eps)
        assert abs(float(np.sum(np.asarray(g, np.float64) * v)) - fd) < 1e-4 * max(1.0, abs(fd)), i


@pytest.mark.parametrize("shift", ["all_below_clamp", "mixed"])
def test_extreme_gate_logits_stay_finite_and_agree(shift):
    """Logits far below the clamp at -80 (every sigmoid underflows float32 without it), or a mix
    of very negative, very positive and ordinary ones: values and gradients agree across
    backends, and the gradient of a clamped logit is 0."""
    x, lam, w = random_inputs(2, 5, 6, 4, 2, ALL)
    if shift == "all_below_clamp":
        w = w - 150.0
    else:
        u = jax.random.uniform(jax.random.PRNGKey(7), w.shape)
        mag = jax.random.uniform(jax.random.PRNGKey(8), w.shape, jnp.float32, 20.0, 120.0)
        w = jnp.where(u < 0.3, -mag, jnp.where(u > 0.85, mag, w))
    outs = [gspn_scan(x, lam, w, backend=b) for b in BACKENDS]
    grads = [jax.grad(loss_fn(b), argnums=(0, 1, 2))(x, lam, w) for b in BACKENDS]
    for h, g in zip(outs, grads):
        assert np.isfinite(np.asarray(h)).all()
        assert all(np.isfinite(np.asarray(a)).all() for a in g)
        np.testing.assert_allclose(h, outs[0], rtol=1e-5, atol=1e-5)
        for a, ref in zip(g, grads[0]):
            np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(g[2])[np.asarray(w) < -80.0] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_and_vmap_equal_a_loop(backend):
    directions = ("lr", "bt")
    stacks = [random_inputs(2, 5, 4, 6, 3, directions) for _ in range(3)]
    xs, lams, ws = (jnp.stack(a) for a in zip(*stacks))
    fn = lambda x, lam, w: gspn_scan(x, lam, w, directions=directions, chunk=2, backend=backend)
    batched = jax.jit(jax.vmap(fn))(xs, lams, ws)
    for i, args in enumerate(stacks):
        np.testing.assert_allclose(batched[i], fn(*args), rtol=1e-6, atol=1e-6)
    # Unbatched operands and vmapped gradients (the backward kernel under vmap too).
    grad_fn = jax.vmap(jax.grad(lambda x, lam, w: jnp.sum(fn(x, lam, w) ** 2), argnums=(0, 2)),
                       in_axes=(0, None, 0))
    dxs, dws = jax.jit(grad_fn)(xs, lams[0], ws)
    for i, (x, _, w) in enumerate(stacks):
        dx, dw = jax.grad(lambda x, w: jnp.sum(fn(x, lams[0], w) ** 2), argnums=(0, 1))(x, w)
        np.testing.assert_allclose(dxs[i], dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dws[i], dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    args = random_inputs(3, 9, 8, 16, 4, ALL)
    loss = jax.jit(jax.value_and_grad(loss_fn(backend), argnums=(0, 1, 2)))
    first, second = loss(*args), loss(*args)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (see conftest)")
@pytest.mark.parametrize("backend", ["auto", "ffi"] if HAS_FFI else ["auto"])
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("G", [8, 4, 2])  # per-channel gates, whole groups per shard, ...
def test_sharded_equals_unsharded_without_collectives(backend, axis_type, G):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    B, H, W, C = 8, 5, 6, 8  # 2 channel shards hold G / 2 whole gate groups each
    x, lam, w = random_inputs(B, H, W, C, G, ALL)
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    xs = put(x, "data", None, None, "model")
    lams = put(lam, None, "data", None, None, "model")
    ws = put(w, None, "data", None, None, "model", None)

    fwd = jax.jit(lambda *a: gspn_scan(*a, chunk=4, backend=backend))
    bwd = jax.jit(jax.grad(lambda *a: jnp.sum(gspn_scan(*a, chunk=4, backend=backend) ** 2),
                           argnums=(0, 1, 2)))
    for fn in (fwd, bwd):
        hlo = fn.lower(xs, lams, ws).compile().as_text()
        assert not [op for op in COLLECTIVES if op in hlo], fn
    h = fwd(xs, lams, ws)
    assert h.sharding.spec == P(None, "data", None, None, "model")
    np.testing.assert_allclose(h, gspn_scan(x, lam, w, chunk=4, backend="reference"),
                               rtol=1e-6, atol=1e-6)
    for got, want in zip(bwd(xs, lams, ws), jax.grad(
            lambda *a: jnp.sum(gspn_scan(*a, chunk=4, backend="reference") ** 2),
            argnums=(0, 1, 2))(x, lam, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (see conftest)")
@pytest.mark.parametrize("G", [2, 1])  # 8 channel shards split the groups: must gather
def test_channel_shards_that_split_a_gate_group_still_compute_the_right_result(G):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    x, lam, w = random_inputs(2, 4, 5, 16, G, ("tb", "lr"))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, None, None, "model")))
    lams = jax.device_put(lam, NamedSharding(mesh, P(None, None, None, None, "model")))
    fn = lambda *a: gspn_scan(*a, directions=("tb", "lr"))
    h = jax.jit(fn)(xs, lams, w)
    np.testing.assert_allclose(h, gspn_scan(x, lam, w, directions=("tb", "lr"),
                                            backend="reference"), rtol=1e-6, atol=1e-6)
    dx = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2)))(xs, lams, w)
    np.testing.assert_allclose(dx, jax.grad(lambda *a: jnp.sum(gspn_scan(
        *a, directions=("tb", "lr"), backend="reference") ** 2))(x, lam, w), rtol=1e-5, atol=1e-5)


def test_auto_backend_uses_the_cpu_kernel_when_built():
    x, lam, w = random_inputs(1, 4, 4, 4, 2, ALL)
    hlo = jax.jit(lambda *a: gspn_scan(*a)).lower(x, lam, w).as_text()
    assert ("cgspn_gspn_fwd" in hlo) == HAS_FFI


def test_build_info_reports_the_kernels():
    info = cgspn_jax.build_info()
    assert set(info) >= {"cpu_kernel", "cuda_kernel", "cuda_architectures", "cuda_max_line_length"}
    assert isinstance(info["cpu_kernel"], bool) and isinstance(info["cuda_kernel"], bool)
    if os.environ.get("CI"):  # CI installs the package: the kernels must be there, not skipped
        assert info["cpu_kernel"]
        if shutil.which("nvcc"):
            assert info["cuda_kernel"] and "90" in info["cuda_architectures"]


# ----------------------------------------------------------------------------- bad input

def _good():
    return random_inputs(2, 3, 4, 6, 3, ("tb", "lr"))


BAD_CALLS = [
    ("rank 4", lambda x, l, w: (x[0], l, w), {}, ValueError),
    ("rank 5", lambda x, l, w: (x, l[0], w), {}, ValueError),
    ("rank 6", lambda x, l, w: (x, l, w[..., 0]), {}, ValueError),
    ("lam must have shape", lambda x, l, w: (x, l[:, :1], w), {}, ValueError),
    ("w must have shape", lambda x, l, w: (x, l, w[:, :, :2]), {}, ValueError),
    ("w must have shape", lambda x, l, w: (x, l, w[..., :2]), {}, ValueError),
    ("lam must have shape", lambda x, l, w: (x, l[:1], w), {}, ValueError),
    ("must divide the channels", lambda x, l, w: (x, l, jnp.concatenate([w, w[..., :1, :]], 4)), {}, ValueError),
    ("unknown", lambda *a: a, {"directions": ("tb", "up")}, ValueError),
    ("distinct", lambda *a: a, {"directions": ("tb", "tb")}, ValueError),
    ("sequence of names", lambda *a: a, {"directions": "tb"}, TypeError),
    ("chunk", lambda *a: a, {"chunk": 0}, ValueError),
    ("chunk", lambda *a: a, {"chunk": 1.5}, ValueError),
    ("backend", lambda *a: a, {"backend": "cuda"}, ValueError),
    ("share one dtype", lambda x, l, w: (x.astype(jnp.bfloat16), l, w), {}, TypeError),
    ("x must be float32", lambda x, l, w: (x.astype(jnp.int32), l, w), {}, TypeError),
    ("must be an array", lambda x, l, w: (x.tolist(), l, w), {}, TypeError),
]


@pytest.mark.parametrize("message,mutate,kwargs,error", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_a_clear_error(message, mutate, kwargs, error):
    args = mutate(*_good())
    kwargs = {"directions": ("tb", "lr"), **kwargs}
    with pytest.raises(error, match=message):
        gspn_scan(*args, **kwargs)
    # ... also under jit, before anything is compiled.
    if all(hasattr(a, "shape") for a in args):
        with pytest.raises(error, match=message):
            jax.jit(lambda *a: gspn_scan(*a, **kwargs)).lower(*args)


@pytest.mark.parametrize("h, w", [(2**31, 1), (1, 2**31)])
def test_lines_past_32_bits_raise_a_clear_error(h, w):
    """Shapes only (nothing of that size is allocated): H or W of 2**31 is refused by name."""
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((1, h, w, 1), f32), jax.ShapeDtypeStruct((1, 1, h, w, 1), f32),
            jax.ShapeDtypeStruct((1, 1, h, w, 1, 3), f32))
    with pytest.raises(ValueError, match=r"H and W must be below 2\*\*31"):
        jax.eval_shape(lambda *a: gspn_scan(*a, directions=("tb",)), *args)
    # Just below the bound the shapes pass (the call is only traced).
    small = 2**31 - 1
    args = tuple(jax.ShapeDtypeStruct(tuple(small if d >= 2**31 else d for d in a.shape), f32)
                 for a in args)
    assert jax.eval_shape(lambda *a: gspn_scan(*a, directions=("tb",)), *args).shape[2:4] == \
        (min(h, small), min(w, small))


def test_nested_vmap_over_two_leading_axes():
    directions = ("tb", "rl")
    x, lam, w = random_inputs(2, 4, 3, 4, 2, directions)
    xs = jnp.stack([jnp.stack([x, 2 * x, -x]), jnp.stack([x, x + 1, 3 * x])])  # [2, 3, B, ...]
    fn = lambda x: gspn_scan(x, lam, w, directions=directions)
    got = jax.jit(jax.vmap(jax.vmap(fn)))(xs)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], fn(xs[i, j]), rtol=1e-6, atol=1e-6)
