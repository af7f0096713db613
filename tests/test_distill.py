"""Distillation (cgspn_jax.distill) on CPU: losses, frozen parts, training, resume, sharding,
high-resolution transfer and bad inputs. Tiny models (width 16, 2 blocks, 16 px) keep it fast."""
import hashlib
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cgspn_jax import save_teacher
from cgspn_jax.distill import data, losses, make_config, parse_args, run
from cgspn_jax.distill.checkpoint import StageCheckpoints, load_model
from cgspn_jax.distill.config import with_model_shape
from cgspn_jax.distill.modules import (build_models, copy_shared_parts, make_stage1_trainable,
                                       stage2_trainable)
from cgspn_jax.distill.parallel import make_mesh
from cgspn_jax.distill.run import main
from cgspn_jax.distill.stages import Stage, make_stage2_objective, stage1_objective
from cgspn_jax.distill.train import StageRunner
from cgspn_jax.models import ViT, count_params, init_student_from_teacher
from cgspn_jax.models.vit import resize_posemb

TINY = dict(image_size=16, patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2,
            latent_dim=8, adapter_dim=8, batch_size=16, max_shift=1, progress=False,
            linear_probe=False, mesh_data=1, mesh_fsdp=1)
# One run, shared by several tests: checkpoints every 8 steps, a metrics line every 4. The tiny
# ViT needs some 100 steps before its loss moves (each takes milliseconds).
RUN_STEPS = dict(teacher_steps=120, stage1_steps=48, stage2_steps=48, checkpoint_every=8,
                 log_every=4, teacher_lr=3e-3, stage1_lr=1e-2, stage2_lr=3e-3)


def tiny_config(**overrides):
    """The tiny run's config, its model fields filled (as a run does without --teacher)."""
    return with_model_shape(make_config(**{**TINY, **RUN_STEPS, **overrides}))


def params_of(module):
    return {"/".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def tree_digest(directory):
    """Hash of every file's path and bytes under ``directory``."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "run")
    summary = run(tiny_config(out=out))
    return out, summary


# ----------------------------------------------------------------------------- losses


def test_losses_match_hand_computed_values():
    assert float(losses.mse(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))) == pytest.approx(2.5)
    # softmax([0, 0]) = (1/2, 1/2); softmax([ln 3, 0]) = (3/4, 1/4).
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    target, prediction = jnp.array([[0.0, 0.0]]), jnp.array([[math.log(3.0), 0.0]])
    assert float(losses.softmax_kl(prediction, target)) == pytest.approx(kl, rel=1e-6)
    # At T = 2: softmax([ln 3 / 2, 0]) = (sqrt 3, 1) / (sqrt 3 + 1), times T^2 = 4.
    q = (math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1))
    kl_t2 = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert float(losses.softmax_kl(prediction, target, 2.0)) == pytest.approx(kl_t2, rel=1e-6)
    cos = float(losses.cosine_distance(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 1.0]])))
    assert cos == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)

    loss, aux = losses.stage1_loss([jnp.ones(3), jnp.zeros(3)], [jnp.zeros(3), jnp.zeros(3)])
    assert float(loss) == pytest.approx(0.5)
    np.testing.assert_allclose(aux["mse_per_block"], [1.0, 0.0])

    # Two blocks; tap values chosen so that every part is known.
    s_mixer = [prediction, target]       # MSE (ln 3)^2 / 2 and 0; KL kl and 0
    t_mixer = [target, target]
    s_block = [jnp.array([[2.0, 0.0]])] * 2
    t_block = [jnp.array([[0.0, 0.0]])] * 2   # MSE 2 each; KL of softmax([2, 0]) vs uniform
    p_block = (math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1))
    kl_block = 0.5 * math.log(0.5 / p_block[0]) + 0.5 * math.log(0.5 / p_block[1])
    total, parts = losses.stage2_loss(
        {"mixer": s_mixer, "block": s_block}, {"mixer": t_mixer, "block": t_block},
        jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 1.0]]), alpha=0.5, beta=2.0, kl_weight=0.1,
        temperature=1.0, cosine_weight=3.0)
    mixer_mse, mixer_kl = math.log(3.0) ** 2 / 4, kl / 2
    assert float(parts["mixer_mse"]) == pytest.approx(mixer_mse, rel=1e-6)
    assert float(parts["block_kl"]) == pytest.approx(kl_block, rel=1e-6)
    expected = (0.5 * (mixer_mse + 0.1 * mixer_kl) + 2.0 * (2.0 + 0.1 * kl_block)
                + 3.0 * (1 - 1 / math.sqrt(2)))
    assert float(total) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- data


def test_digits_pipeline_is_deterministic_and_resumable():
    config = tiny_config()
    dataset = data.load_digits(config)
    assert len(dataset.train) + len(dataset.heldout) == 1797 and dataset.num_classes == 10
    batch = lambda it: next(it)["image"]
    first = data.train_iterator(dataset.train, config, local_batch=8)
    same = data.train_iterator(dataset.train, config, local_batch=8)
    other = data.train_iterator(dataset.train, tiny_config(seed=1), local_batch=8)
    a = [batch(first) for _ in range(3)]
    assert a[0].shape == (8, 16, 16, 3) and a[0].dtype == np.uint8
    np.testing.assert_array_equal(a[2], [batch(same) for _ in range(3)][2])
    assert not np.array_equal(a[0], batch(other))
    state = first.get_state()
    expected = batch(first)
    resumed = data.train_iterator(dataset.train, config, local_batch=8)
    resumed.set_state(state)
    np.testing.assert_array_equal(batch(resumed), expected)


def test_npz_and_folder_sources(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((20, 10, 12)).astype(np.float32)
    labels = np.arange(20) % 2
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    dataset = data.load_dataset(tiny_config(data=str(tmp_path / "a.npz")))
    assert len(dataset.train) == 15 and len(dataset.heldout) == 5
    assert dataset.train[0]["image"].shape == (16, 16, 3)
    for split, count in (("train", 3), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((9, 9, 3)) * 255).astype(np.uint8)).save(
                    folder / f"{i}.png")
    dataset = data.load_dataset(tiny_config(data=str(tmp_path / "imgs")))
    assert dataset.class_names == ["cat", "dog"]
    assert (len(dataset.train), len(dataset.heldout)) == (6, 4)
    batches = list(data.eval_batches(dataset.heldout, local_batch=3))
    assert [int(mask.sum()) for _, mask in batches] == [3, 1]


# ----------------------------------------------------------------------------- stages


def test_stage1_trains_only_the_mixers():
    config = tiny_config(stage1_steps=3)
    models = build_models(config, num_classes=10)
    init_student_from_teacher(models.teacher, models.student)
    before = params_of(models)
    stage = Stage("stage1", 3, 1e-2, make_stage1_trainable(models.student), stage1_objective,
                  seed_offset=1)
    runner = StageRunner(stage, models, config, make_mesh(config))
    iterator = runner.iterator(data.load_digits(config).train)
    for _ in range(3):
        runner.step(next(iterator))
    nnx.update(models, runner.trainable)
    after = params_of(models)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    mixer_params = {k for k in before if k.startswith("student/blocks/") and "/mixer/" in k}
    assert changed == mixer_params  # every mixer parameter trains; nothing else moves
    shared = [k for k in before if k.startswith("student/") and k not in mixer_params]
    for key in shared:  # the student's copies of the teacher are still the teacher's
        np.testing.assert_array_equal(after[key], after["teacher/" + key[len("student/"):]])


def test_short_run_lowers_each_stage_loss_and_writes_outputs(finished_run):
    out, summary = finished_run
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for stage in ("teacher", "stage1", "stage2"):
        loss = [r["loss"] for r in records if r["stage"] == stage]
        assert len(loss) == RUN_STEPS[f"{stage}_steps"] // 4, stage
        quarter = len(loss) // 4  # mean of the last quarter vs the first: batches are noisy
        assert np.mean(loss[-quarter:]) < 0.9 * np.mean(loss[:quarter]), (stage, loss)
    for key in ("teacher_accuracy", "student_accuracy", "feature_cosine", "teacher_params",
                "student_params", "wall_time_s"):
        assert key in summary
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["student_params"] == summary["student_params"]
    assert 0 <= summary["student_accuracy"] <= 1 and -1 <= summary["feature_cosine"] <= 1
    with open(os.path.join(out, "loss_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    student, classifier, meta = load_model(os.path.join(out, "student"))
    assert type(student).__name__ == "CGSPNEncoder" and meta["num_classes"] == 10
    assert count_params(student) == summary["student_params"]
    assert count_params(load_model(os.path.join(out, "teacher"))[0]) == summary["teacher_params"]
    # Checkpoints: the last 2 per stage (keep_checkpoints default), the final step among them.
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "stage2"))) == ["40", "48"]


class Killed(Exception):
    pass


def test_killed_and_resumed_run_equals_uninterrupted_run(finished_run, tmp_path, monkeypatch):
    """Killed by a save that fails in the middle of stage 2 (step 16; last good checkpoint: 8),
    then resumed: the final parameters equal the uninterrupted run's bitwise."""
    reference_out, reference = finished_run
    out = str(tmp_path / "run")
    real_save = StageCheckpoints.save

    class DiskFull:
        """In place of the data iterator: asked for its state while orbax writes the step
        (into a temporary folder), it fails."""

        def get_state(self):
            raise Killed("disk full")

    def failing_save(self, step, trainable, opt_state, iterator):
        if os.path.basename(self.directory) == "stage2" and step == 16:
            iterator = DiskFull()
        return real_save(self, step, trainable, opt_state, iterator)

    monkeypatch.setattr(StageCheckpoints, "save", failing_save)
    with pytest.raises(Killed):
        run(tiny_config(out=out))
    monkeypatch.undo()
    stage2 = os.path.join(out, "checkpoints", "stage2")
    assert "8" in os.listdir(stage2) and "16" not in os.listdir(stage2)

    steps_run = []
    real_step = StageRunner.step
    monkeypatch.setattr(StageRunner, "step",
                        lambda self, batch: steps_run.append(self.stage.name)
                        or real_step(self, batch))
    resumed = run(tiny_config(out=out))
    # Teacher and stage 1 came from their checkpoints, stage 2 from step 8.
    assert steps_run == ["stage2"] * (RUN_STEPS["stage2_steps"] - 8)
    for name in ("teacher", "student"):
        got, want = load_model(os.path.join(out, name)), load_model(
            os.path.join(reference_out, name))
        a, b = params_of(got[0]), params_of(want[0])
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    for key in ("teacher_accuracy", "student_accuracy", "feature_cosine"):
        assert resumed[key] == reference[key]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [(r["stage"], r["step"]) for r in map(json.loads, f)]
    expected = sum(RUN_STEPS[f"{stage}_steps"] // 4 for stage in ("teacher", "stage1", "stage2"))
    assert len(steps) == len(set(steps)) == expected  # none written twice by the resumed stage


# "reference" is the pure-JAX scan; "auto" on CPU is the C++ kernel under custom_partitioning.
@pytest.mark.parametrize("scan_backend", ["reference", "auto"])
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (see conftest)")
def test_sharded_step_equals_single_device_step(scan_backend):
    results = {}
    for mesh_data, mesh_fsdp in ((1, 1), (4, 2)):
        config = tiny_config(mesh_data=mesh_data, mesh_fsdp=mesh_fsdp, scan_backend=scan_backend,
                             depth=1)
        models = build_models(config, num_classes=10)
        init_student_from_teacher(models.teacher, models.student)
        stage = Stage("stage2", 10, 1e-2, stage2_trainable, make_stage2_objective(config),
                      seed_offset=2)
        runner = StageRunner(stage, models, config, make_mesh(config))
        iterator = runner.iterator(data.load_digits(config).train)
        metrics = [runner.step(next(iterator)) for _ in range(2)]
        seen = [(float(m["loss"]), float(m["grad_norm"])) for m in metrics]
        results[mesh_data, mesh_fsdp] = seen, params_of(
            nnx.merge(runner.graphdef, runner.trainable, runner.frozen))
        if mesh_fsdp == 2:
            specs = [x.sharding.spec for x in jax.tree.leaves(runner.trainable)]
            assert any("fsdp" in spec for spec in specs)
            assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(runner.opt_state))
    (single_metrics, single), (sharded_metrics, sharded) = results[1, 1], results[4, 2]
    # Loss and gradient norm of both steps (the second after one update).
    np.testing.assert_allclose(sharded_metrics, single_metrics, rtol=1e-5)
    # Adam turns gradients that are zero but for rounding (the MAP head's key bias: softmax
    # ignores it) into steps of either sign, so parameters are compared to a tenth of a step.
    for key in single:
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-4, atol=1e-3, err_msg=key)


def test_high_resolution_transfer_from_a_student(finished_run, tmp_path):
    out, _ = finished_run
    summary = run(tiny_config(out=str(tmp_path / "hires"), teacher=os.path.join(out, "student"),
                              image_size=32, stage1_steps=2, stage2_steps=2))
    assert set(summary["stages"]) == {"stage1", "stage2", "eval"}  # no teacher training
    width = TINY["width"]  # the same model, but a position embedding for an 8 x 8 grid, not 4 x 4
    assert summary["student_params"] == summary["teacher_params"] + (64 - 16) * width
    student, _, meta = load_model(str(tmp_path / "hires" / "student"))
    assert meta["encoder"]["overrides"]["image_size"] == 32

    # At the start, the student is the old one with its position embedding resized.
    teacher = load_model(os.path.join(out, "student"))[0]
    fresh = build_models(tiny_config(image_size=32), num_classes=10, teacher=teacher).student
    copy_shared_parts(teacher, fresh)
    before, after = params_of(teacher), params_of(fresh)
    for key in before:
        if key != "pos_emb":
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    np.testing.assert_array_equal(after["pos_emb"],
                                  resize_posemb(teacher.pos_emb[...], (8, 8)))


def test_pretrained_teacher_without_head_gets_one_fitted(tmp_path):
    """A teacher from `save_teacher` (the format `load_teacher` reads, as SigLIP checkpoints):
    a "head" stage fits a classifier to it, leaving the teacher itself unchanged."""
    vit = ViT("mu", width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16,
              rngs=nnx.Rngs(5))
    save_teacher(vit, tmp_path / "vit")
    summary = run(tiny_config(out=str(tmp_path / "run"), teacher=str(tmp_path / "vit"),
                              depth=1, teacher_steps=8, stage1_steps=2, stage2_steps=2))
    assert set(summary["stages"]) == {"head", "stage1", "stage2", "eval"}
    exported, classifier, _ = load_model(str(tmp_path / "run" / "teacher"))
    assert params_of(classifier)["linear/kernel"].any()  # fitted (it starts at zero)
    before, after = params_of(vit), params_of(exported)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


# ----------------------------------------------------------------------------- bad inputs


def tiny_flags():
    """The finished run's settings as command-line flags."""
    return [f"--{k.replace('_', '-')}={v}" if not isinstance(v, bool)
            else f"--{'' if v else 'no-'}{k.replace('_', '-')}"
            for k, v in {**TINY, **RUN_STEPS}.items()]


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("cgspn-distill: error:")
    return lines[0]


def test_bad_inputs_are_one_line_errors_and_leave_checkpoints_alone(finished_run, tmp_path,
                                                                    capsys):
    out, _ = finished_run
    before = tree_digest(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "val"):  # the first training image is not an image
        (tmp_path / "broken" / split / "a").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "broken" / split / "a" / "1.png")
    (tmp_path / "broken" / "train" / "a" / "0.png").write_bytes(b"not a png")
    tiny = tiny_flags()
    cases = {
        "no such file": ["--data", str(tmp_path / "missing")],
        "no images found": ["--data", str(empty)],
        "cannot read image": ["--data", str(tmp_path / "broken")],
        "another shape": ["--teacher", os.path.join(out, "teacher"), "--width", "32"],
        "cannot load it": ["--teacher", str(empty)],
        "--heldout-fraction: must be <= 0.9": ["--heldout-fraction", "2"],
        "--batch-size: must be >= 1": ["--batch-size", "0"],
        "--directions": ["--directions", "tb", "up"],
        "--stage1-lr: expected float": ["--stage1-lr", "fast"],
        "unrecognized arguments": ["--no-such-flag"],
        "other settings": ["--seed", "7"],
    }
    for expected, argv in cases.items():
        line = one_error_line(capsys, ["--out", out, *tiny, *argv])
        assert expected in line, (expected, line)
    assert tree_digest(out) == before


def test_unreadable_image_mid_run_stops_with_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, label in itertools.product(("train", "val"), ("a", "b")):
        folder = tmp_path / "imgs" / split / label
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(
                folder / f"{i}.png")
    # Not the first training image (that one is read before the run starts).
    (tmp_path / "imgs" / "train" / "b" / "5.png").write_bytes(b"truncated")
    line = one_error_line(capsys, ["--out", str(tmp_path / "run"), *tiny_flags(),
                                   "--batch-size", "4", "--data", str(tmp_path / "imgs"),
                                   "--teacher-steps", "8", "--depth", "1", "--image-size", "8"])
    assert "cannot read image" in line and "5.png" in line
    assert not os.path.exists(tmp_path / "run" / "teacher")  # it stopped in the first stage


def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("stage1_steps: 7\nalpha: 0.5\ndirections: [tb, lr]\n")
    config = parse_args(["--config", str(tmp_path / "c.yaml"), "--out", "x", "--alpha", "2"])
    assert (config.stage1_steps, config.alpha, config.directions) == (7, 2.0, ("tb", "lr"))
    (tmp_path / "c.py").write_text("config = dict(stage2_steps=5, hflip=True)\n")
    config = parse_args(["--config", str(tmp_path / "c.py"), "--out", "x"])
    assert (config.stage2_steps, config.hflip) == (5, True)
