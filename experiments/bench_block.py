"""Block and encoder benchmarks: C-GSPN against the attention ViT it replaces (run on a GPU).

    python experiments/bench_block.py --part blocks   --out runs/bench_block
    python experiments/bench_block.py --part encoders --out runs/bench_block
    python experiments/bench_block.py --quick ...     # tiny sizes: a CPU smoke test

blocks: at each resolution (patch 16, width 1152 = SigLIP So400m, bfloat16 compute), the mixer
  sub-layer alone (norm1 + mixer: C-GSPN, GSPN, cuDNN attention) and the whole pre-LN block (C-GSPN,
  ViT, and the block with its mixer removed: the floor any mixer can reach), forward and
  forward + backward (grad w.r.t. parameters and input), median latency, images/s and compiled
  peak memory; speedups C-GSPN / attention measured side by side. At the highest resolution also
  the largest batch each block fits.
encoders: the whole encoder (depth 27 at So400m width) of both kinds, batch 1, forward, at each
  resolution: latency and memory, or "out of memory". Writes a PNG of latency vs resolution.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgspn_jax.models import CGSPNEncoder, CGSPNMixer, GSPNMixer, ViT
from cgspn_jax.models.vit import Attention, Block


def median_ms(fn, inputs, inner=5, repeats=7):
    """Median over `repeats` of the mean time of `inner` back-to-back calls, rotating inputs."""
    jax.block_until_ready(fn(*inputs[0]))  # compile + warm-up
    jax.block_until_ready(fn(*inputs[1 % len(inputs)]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(inner):
            out = fn(*inputs[i % len(inputs)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def compiled_bytes(fn, *args) -> int:
    """Peak device memory of one call as XLA plans it: arguments + outputs + temporaries."""
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class MlpOnly(nnx.Module):
    """The block with its mixer sub-layer removed: x + mlp(norm2(x))."""

    def __init__(self, block: Block):
        self.norm2, self.mlp = block.norm2, block.mlp

    def __call__(self, x):
        return x + self.mlp(self.norm2(x))


class MixerSublayer(nnx.Module):
    """norm1 + mixer of a block: what replacing attention replaces."""

    def __init__(self, block: Block):
        self.block = block

    def __call__(self, x):
        return self.block.mixer_sublayer(x)


def make_functions(module: nnx.Module):
    """(forward, forward+backward) jitted on (params, x); grads w.r.t. params and input."""
    graphdef, params = nnx.split(module)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32))
    train = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return params, forward, train


def build_blocks(cfg, rngs):
    dt, C = cfg.dtype, cfg.width
    attention = Attention(C, cfg.heads, dtype=dt, implementation=cfg.attention, rngs=rngs)
    vit_block = Block(attention, C, cfg.mlp, dtype=dt, rngs=rngs)
    cgspn_block = Block(CGSPNMixer(C, dtype=dt, rngs=rngs), C, cfg.mlp, dtype=dt, rngs=rngs)
    gspn_block = Block(GSPNMixer(C, dtype=dt, rngs=rngs), C, cfg.mlp, dtype=dt, rngs=rngs)
    return {
        "mixer: attention": MixerSublayer(vit_block),
        "mixer: C-GSPN": MixerSublayer(cgspn_block),
        "mixer: GSPN": MixerSublayer(gspn_block),
        "block: ViT": vit_block,
        "block: C-GSPN": cgspn_block,
        "block: MLP only": MlpOnly(vit_block),
    }


def bench_blocks(cfg, results):
    modules = build_blocks(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    rows = []
    for res in cfg.resolutions:
        batch = cfg.batch_high if res >= cfg.high_res else cfg.batch
        grid = res // cfg.patch
        inputs = [(jnp.asarray(rng.normal(size=(batch, grid, grid, cfg.width)), cfg.dtype),)
                  for _ in range(3)]
        for name, module in modules.items():
            params, forward, train = make_functions(module)
            for mode, fn in (("forward", forward), ("forward+backward", train)):
                row = dict(name=name, mode=mode, resolution=res, batch=batch, tokens=grid * grid)
                try:
                    args = [(params, *x) for x in inputs]
                    row["memory_gib"] = compiled_bytes(fn, *args[0]) / 2**30
                    row["ms"] = median_ms(fn, args)
                    row["images_per_s"] = batch / row["ms"] * 1e3
                except Exception as err:  # noqa: BLE001 - report OOM, re-raise anything else
                    if not is_oom(err):
                        raise
                    row["ms"] = None
                    row["error"] = "out of memory"
                rows.append(row)
                results["blocks"] = rows
                save_partial(results, cfg)
                print(f"  {res:>5} px B{batch:<3} {mode:<17} {name:<18} "
                      f"{_fmt(row.get('ms'))} ms  {row.get('memory_gib', float('nan')):6.2f} GiB",
                      flush=True)
    results["blocks"] = rows
    if cfg.high_res in cfg.resolutions:
        results["largest_batch"] = largest_batches(cfg, modules)


def largest_batches(cfg, modules):
    """Largest batch (doubling from batch_high) whose compiled forward fits the device memory,
    for the two blocks, and its forward throughput."""
    limit = jax.devices()[0].memory_stats().get("bytes_limit") if hasattr(
        jax.devices()[0], "memory_stats") and jax.devices()[0].memory_stats() else None
    grid = cfg.high_res // cfg.patch
    out = {}
    for name in ("block: ViT", "block: C-GSPN"):
        params, forward, _ = make_functions(modules[name])
        batch, best = cfg.batch_high, None
        while batch <= cfg.max_batch:
            x = jax.ShapeDtypeStruct((batch, grid, grid, cfg.width), cfg.dtype)
            try:
                need = compiled_bytes(forward, params, x)
            except Exception as err:  # noqa: BLE001 - e.g. the autotuner failing to allocate
                if batch == cfg.batch_high:
                    raise
                print(f"  batch {batch} does not compile: {str(err).splitlines()[0][:200]}")
                break
            if limit is not None and need > 0.92 * limit:
                break
            best, batch = batch, batch * 2
        entry = dict(batch=best)
        if best:
            x = jnp.asarray(np.random.default_rng(1).normal(size=(best, grid, grid, cfg.width)),
                            cfg.dtype)
            try:
                entry["ms"] = median_ms(forward, [(params, x)], inner=2, repeats=3)
                entry["images_per_s"] = best / entry["ms"] * 1e3
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                entry["error"] = "out of memory when run"
        out[name] = entry
        print(f"  largest forward batch at {cfg.high_res} px, {name}: {entry}", flush=True)
    return out


def bench_encoders(cfg, results):
    rows = []
    overrides = dict(width=cfg.width, depth=cfg.depth, mlp_dim=cfg.mlp, num_heads=cfg.heads,
                     patch_size=cfg.patch, dtype=cfg.dtype, image_size=224)
    for kind, cls in (("ViT", ViT), ("C-GSPN", CGSPNEncoder)):
        extra = dict(attention_implementation=cfg.attention) if cls is ViT else {}
        model = cls("So400m", rngs=nnx.Rngs(0), **overrides, **extra)
        graphdef, params = nnx.split(model)
        forward = jax.jit(lambda p, x, g=graphdef: nnx.merge(g, p)(x))
        for res in cfg.encoder_resolutions:
            x = jnp.asarray(np.random.default_rng(res).normal(size=(1, res, res, 3)), cfg.dtype)
            row = dict(encoder=kind, resolution=res, batch=1, depth=cfg.depth)
            try:
                row["memory_gib"] = compiled_bytes(forward, params, x) / 2**30
                row["ms"] = median_ms(forward, [(params, x)], inner=2, repeats=5)
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                row["ms"], row["error"] = None, "out of memory"
            rows.append(row)
            results["encoders"] = rows
            save_partial(results, cfg)
            print(f"  encoder {kind:<7} {res:>5} px: {_fmt(row['ms'])} ms "
                  f"{row.get('memory_gib', float('nan')):6.2f} GiB", flush=True)
        del model, params
    results["encoders"] = rows


def bench_breakdown(cfg, results):
    """Where the C-GSPN mixer sub-layer's time goes, piece by piece, forward, at the two high
    resolutions: norm1 + down-projection; the lam / u / gate projections; the scan alone (per-
    channel gates, and gates shared by groups of 16 channels); the u-gated merge + norm + up-
    projection."""
    from cgspn_jax import gspn_scan

    block = build_blocks(cfg, nnx.Rngs(0))["mixer: C-GSPN"].block
    mixer, prop = block.mixer, block.mixer.propagation
    rng = np.random.default_rng(0)
    rows = []
    for res in [r for r in cfg.resolutions if r >= cfg.high_res // 2]:
        batch = cfg.batch_high if res >= cfg.high_res else cfg.batch
        grid = res // cfg.patch
        x = jnp.asarray(rng.normal(size=(batch, grid, grid, cfg.width)), cfg.dtype)
        n_dir, k = len(prop.directions), mixer.latent_dim
        split = lambda a, *tail: jnp.moveaxis(a.reshape(batch, grid, grid, n_dir, *tail), 3, 0)

        def projections(m, latent):
            p = m.propagation
            return (jax.nn.sigmoid(split(p.lam_proj(latent), k)).astype(cfg.dtype),
                    split(p.u_proj(latent), k).astype(cfg.dtype),
                    split(p.gate_proj(latent), p.gate_groups, 3).astype(cfg.dtype))

        def merge_up(m, u, h):
            return m.up(m.propagation.norm(jnp.sum(u * h, axis=0)))

        pieces = {
            "norm1 + down": (lambda b, x: b.mixer.down(b.norm1(x)), (x,)),
        }
        latent = jax.jit(pieces["norm1 + down"][0])(block, x)
        lam, u, gates = jax.jit(lambda b, l: projections(b.mixer, l))(block, latent)
        h = gspn_scan(latent, lam, gates)
        g_shared = k // 16 if k % 16 == 0 else 1
        shared = jnp.asarray(rng.normal(size=(*gates.shape[:4], g_shared, 3)), cfg.dtype)
        pieces.update({
            "lam/u/gate projections": (lambda b, l: projections(b.mixer, l), (latent,)),
            f"scan, G = {k}": (lambda b, *a: gspn_scan(*a), (latent, lam, gates)),
            f"scan, G = {g_shared}": (lambda b, *a: gspn_scan(*a), (latent, lam, shared)),
            "merge + norm + up": (lambda b, u, h: merge_up(b.mixer, u, h), (u, h)),
            "whole sub-layer": (lambda b, x: b.mixer_sublayer(x), (x,)),
        })
        graphdef, state = nnx.split(block)
        for name, (fn, args) in pieces.items():
            # jax.jit over the split state: nnx.jit's per-call graph traversal would swamp
            # sub-millisecond pieces.
            jitted = jax.jit(lambda st, *a, fn=fn: fn(nnx.merge(graphdef, st), *a))
            ms = median_ms(jitted, [(state, *args)])
            rows.append(dict(piece=name, resolution=res, batch=batch, ms=ms))
            results["breakdown"] = rows
            save_partial(results, cfg)
            print(f"  breakdown {res:>5} px B{batch:<3} {name:<24} {ms:8.3f} ms", flush=True)


def save_partial(results, cfg):
    """Rows so far, so that a run stopped at its time limit still leaves its numbers."""
    (cfg.out / f"bench_block_{cfg.part}.partial.json").write_text(json.dumps(results, indent=2))


def _fmt(ms):
    return f"{ms:9.2f}" if ms is not None else "      OOM"


def summarise(results, cfg):
    lines = []
    if "blocks" in results:
        table = {(r["name"], r["mode"], r["resolution"]): r for r in results["blocks"]}
        lines.append(f"Blocks, width {cfg.width}, patch {cfg.patch}, {jnp.dtype(cfg.dtype).name}, "
                     f"median ms (images/s)")
        head = f"{'px':>5} {'B':>3} {'mode':<17}" + "".join(
            f"{n.split(': ')[1][:12]:>13}" for n in ("mixer: attention", "mixer: C-GSPN",
                                                    "mixer: GSPN", "block: ViT", "block: C-GSPN",
                                                    "block: MLP only")) + f"{'mixer x':>9}{'block x':>9}"
        lines.append(head)
        for res in cfg.resolutions:
            for mode in ("forward", "forward+backward"):
                cells, batch = [], None
                for n in ("mixer: attention", "mixer: C-GSPN", "mixer: GSPN", "block: ViT",
                          "block: C-GSPN", "block: MLP only"):
                    r = table[(n, mode, res)]
                    batch = r["batch"]
                    cells.append(f"{_fmt(r['ms']):>13}")
                ratio = lambda a, b: (table[(a, mode, res)]["ms"] / table[(b, mode, res)]["ms"]
                                      if table[(a, mode, res)]["ms"] and table[(b, mode, res)]["ms"] else float("nan"))
                lines.append(f"{res:>5} {batch:>3} {mode:<17}" + "".join(cells)
                             + f"{ratio('mixer: attention', 'mixer: C-GSPN'):>8.1f}x"
                             + f"{ratio('block: ViT', 'block: C-GSPN'):>8.2f}x")
        lines.append("targets (H100, forward): block >= 2.5x at 1024 px and >= 6x at 2048 px; "
                     "mixer >= 20x at 1024 px")
    if "largest_batch" in results:
        for name, entry in results["largest_batch"].items():
            lines.append(f"largest forward batch at {cfg.high_res} px, {name}: {entry}")
    if "breakdown" in results:
        lines.append("C-GSPN mixer sub-layer, forward, by piece (median ms)")
        for r in results["breakdown"]:
            lines.append(f"  {r['resolution']:>5} px B{r['batch']:<3} {r['piece']:<24} {r['ms']:8.3f}")
    if "encoders" in results:
        lines.append(f"Whole encoders (depth {cfg.depth}, width {cfg.width}, patch {cfg.patch}), "
                     f"batch 1, forward, median ms / compiled GiB")
        for r in results["encoders"]:
            lines.append(f"  {r['encoder']:<7} {r['resolution']:>5} px {_fmt(r['ms'])} ms "
                         f"{r.get('memory_gib', float('nan')):7.2f} GiB")
    return "\n".join(lines)


def plot_encoders(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("ViT", "C-GSPN"):
        rows = [r for r in results["encoders"] if r["encoder"] == kind and r["ms"]]
        ax.plot([r["resolution"] for r in rows], [r["ms"] for r in rows], "o-", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image side (px)")
    ax.set_ylabel("forward latency, batch 1 (ms)")
    ax.set_title(f"{results['device']}: whole encoder, {results['config']['depth']} blocks")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["blocks", "encoders", "breakdown", "largest", "all"],
                   default="all")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search")
    p.add_argument("--out", default="runs/bench_block")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    args = p.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    cfg = argparse.Namespace(
        width=1152, heads=16, mlp=4304, patch=16, depth=27, dtype=jnp.bfloat16,
        resolutions=[224, 512, 1024, 2048], high_res=2048, batch=32, batch_high=8, max_batch=64,
        encoder_resolutions=[224, 512, 1024, 2048],
        attention="cudnn" if on_gpu else "xla")
    if args.quick:
        cfg.__dict__.update(width=64, heads=4, mlp=128, depth=2, dtype=jnp.float32,
                            resolutions=[64, 128], high_res=128, batch=2, batch_high=1,
                            max_batch=4, encoder_resolutions=[64, 128])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.out, cfg.part = out, args.part
    device = jax.devices()[0].device_kind
    results = dict(device=device, date=datetime.date.today().isoformat(), jax=jax.__version__,
                   config={k: (jnp.dtype(v).name if k == "dtype" else v)
                           for k, v in vars(cfg).items() if k not in ("out", "part")})
    print(f"device: {device}, jax {jax.__version__}", flush=True)
    if args.part in ("blocks", "all"):
        bench_blocks(cfg, results)
    if args.max_batch:
        cfg.max_batch = args.max_batch
    if args.part in ("breakdown", "all"):
        bench_breakdown(cfg, results)
    if args.part == "largest":
        results["largest_batch"] = largest_batches(cfg, build_blocks(cfg, nnx.Rngs(0)))
    if args.part in ("encoders", "all"):
        bench_encoders(cfg, results)
        plot_encoders(results, out / "encoder_latency.png")
    (out / f"bench_block_{args.part}.json").write_text(json.dumps(results, indent=2))
    summary = summarise(results, cfg)
    (out / f"bench_block_{args.part}.txt").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
