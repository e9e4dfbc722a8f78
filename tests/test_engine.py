"""The engine: chunks of steps, packs of trials, hyperparameters as data, divergence."""

import copy
import json
import os

import jax
import numpy as np
import pytest

from cifar_jax import engine, input_pipeline, train


pytestmark = pytest.mark.xdist_group("engine")  # one worker: the compiled programs are shared


@pytest.fixture(scope="module")
def shared_engine():
    return engine.Engine()


def _small(tiny_config, **fields):
    c = copy.deepcopy(tiny_config)
    c.batch_size, c.eval_batch_size, c.log_every_steps = 16, 50, 3
    c.data.synthetic_train_size, c.data.synthetic_test_size = 148, 50  # 3 steps per epoch
    for k, v in fields.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _states_after(config, step_loop, chunks, shared_engine, seed=0):
    config = _small(config, step_loop=step_loop, seed=seed)
    ds = input_pipeline.load_dataset(config.data)
    programs = shared_engine.programs(engine.static_spec(config, len(ds.train)))
    states = programs.to_device(engine.stack([jax.device_get(programs.init_state(config))]))
    progress = programs.to_device(engine.stack([engine.Progress.empty()]))
    images, labels = programs.to_device(ds.train.images), programs.to_device(ds.train.labels)
    perms = programs.permutations(states, 0)
    for n in chunks:
        states, progress = programs.train_chunk(states, progress, images, labels, perms, n)
    return jax.device_get((states, progress))


def test_chunk_on_device_equals_step_by_step(tiny_config, shared_engine):
    """One on-device loop of 3 steps = 3 dispatches of one step (the CPU path).

    The two are separate XLA programs, so float32 results agree to rounding (XLA may fuse and
    reassociate differently inside the loop body). Adam's first updates are g / (|g| + eps),
    which moves an element with a near-zero gradient by up to the learning rate on a round-off
    difference, so each tensor is compared by its norm: 1e-5 relative after 3 steps.
    """
    loop_states, loop_progress = _states_after(tiny_config, "device", [3], shared_engine)
    step_states, step_progress = _states_after(tiny_config, "host", [3], shared_engine)
    assert int(loop_states.step[0]) == int(step_states.step[0]) == 3
    for a, b in zip(jax.tree.leaves(loop_states.params), jax.tree.leaves(step_states.params)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
    np.testing.assert_allclose(loop_progress.epoch.loss.compute(),
                               step_progress.epoch.loss.compute(), rtol=1e-5)
    # The same program in chunks of different length gives bit-identical states.
    split_states, _ = _states_after(tiny_config, "device", [1, 2], shared_engine)
    for a, b in zip(jax.tree.leaves(loop_states), jax.tree.leaves(split_states)):
        np.testing.assert_array_equal(a, b)
    # And the seed really matters (init, data order, augmentation, dropout all follow it).
    other, _ = _states_after(tiny_config, "host", [3], shared_engine, seed=1)
    assert not np.allclose(other.params["fc"]["kernel"], step_states.params["fc"]["kernel"])


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pack_trials_match_their_single_runs(tiny_config, tmp_path):
    """Three trials differing in learning rate, weight decay and dropout, trained as one
    pack, match the same trials trained alone, and a diverging pack-mate changes nothing.

    Same data order, augmentation and dropout masks (each trial's seed-derived keys); the
    vmapped convolutions become grouped ones, whose float32 sums are ordered differently, so
    losses agree to 1e-4 relative rather than bitwise; accuracies on 100 images to one image.
    """
    configs = [_small(tiny_config, learning_rate=0.001, weight_decay=1e-4, dropout_rate=0.5),
               _small(tiny_config, learning_rate=0.002, weight_decay=5e-4, dropout_rate=0.3),
               _small(tiny_config, learning_rate=1e30, weight_decay=5e-4, optimizer="sgd",
                      dropout_rate=0.0, seed=3)]  # diverges within a few steps
    shared_engine = engine.Engine()
    packed = [str(tmp_path / f"pack{i}") for i in range(3)]
    results = train.train_pack(configs, packed, engine=shared_engine)
    assert [r["status"] for r in results] == ["completed", "completed", "diverged"]
    assert shared_engine.compiles() == {"tiny": 1}  # the pack's program
    for i, config in enumerate(configs):
        alone = str(tmp_path / f"alone{i}")
        result = train.train_pack([config], [alone], engine=shared_engine)[0]
        assert result["status"] == results[i]["status"]
        if result["status"] == "diverged":
            assert result["step"] == results[i]["step"]  # the same first non-finite step
            assert result["error"].split(". ")[0] == results[i]["error"].split(". ")[0]
            continue
        for a, b in zip(_records(alone), _records(packed[i])):
            for key in ("train_loss", "val_loss"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4)
            for key in ("train_accuracy", "val_accuracy"):
                assert abs(b[key] - a[key]) <= 0.011
        assert abs(result["test_accuracy"] - results[i]["test_accuracy"]) <= 0.021
    assert shared_engine.compiles() == {"tiny": 2}  # the singles shared one program


def test_non_finite_step_is_exact_inside_a_chunk(tiny_config, shared_engine):
    config = _small(tiny_config, optimizer="sgd", learning_rate=1e30, step_loop="device")
    ds = input_pipeline.load_dataset(config.data)
    programs = shared_engine.programs(engine.static_spec(config, len(ds.train)))
    initial = engine.stack([jax.device_get(programs.init_state(config))])  # on the host
    data = programs.to_device(ds.train.images), programs.to_device(ds.train.labels)
    perms = programs.permutations(programs.to_device(initial), 0)
    # Step by step (the programs donate their inputs: each run starts from a fresh copy),
    # the first step whose loss is not finite:
    s = programs.to_device(initial)
    first_bad, p = None, programs.to_device(engine.stack([engine.Progress.empty()]))
    for step in range(1, 4):
        s, p = programs.train_chunk(s, p, *data, perms, 1)
        if first_bad is None and int(p.first_bad_step[0]) >= 0:
            first_bad = int(p.first_bad_step[0])
    assert first_bad is not None and first_bad <= 3
    p = programs.to_device(engine.stack([engine.Progress.empty()]))
    frozen, p = programs.train_chunk(programs.to_device(initial), p, *data, perms, 3)
    assert int(p.first_bad_step[0]) == first_bad
    assert not np.isfinite(float(p.bad_loss[0]))
    # The trial is frozen at its state before that step.
    assert int(frozen.step[0]) == first_bad - 1


def test_ema_weights_are_averaged_and_evaluated(tiny_config, shared_engine):
    """With ema_decay > 0 the state keeps ema = d * ema + (1 - d) * weights after every step,
    and evaluation uses those averaged weights (and batch statistics, where the model has
    them), not the raw ones."""
    config = _small(tiny_config, ema_decay=0.5)
    ds = input_pipeline.load_dataset(config.data)
    programs = shared_engine.programs(engine.static_spec(config, len(ds.train)))
    initial = jax.device_get(programs.init_state(config))
    assert initial.ema is not None
    states = programs.to_device(engine.stack([initial]))
    progress = programs.to_device(engine.stack([engine.Progress.empty()]))
    data = programs.to_device(ds.train.images), programs.to_device(ds.train.labels)
    states, _ = programs.train_chunk(states, progress, *data, programs.permutations(states, 0), 1)
    state = jax.device_get(engine.unstack(states, 0))
    for new, old, ema in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial.params),
                             jax.tree.leaves(state.ema["params"])):
        np.testing.assert_allclose(ema, 0.5 * old + 0.5 * new, rtol=1e-5, atol=1e-7)
    split = input_pipeline.Split(ds.test.images[:40], ds.test.labels[:40])
    eval_data = engine.put_eval_splits({"x": split}, 50, programs)
    with_ema = engine.evaluate(programs, programs.to_device(engine.stack([state])), eval_data,
                               "x")[0]
    swapped = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"],
                            ema=None)
    plain = shared_engine.programs(engine.static_spec(_small(config, ema_decay=0.0),
                                                      len(ds.train)))
    raw = engine.evaluate(plain, plain.to_device(engine.stack([state.replace(ema=None)])),
                          engine.put_eval_splits({"x": split}, 50, plain), "x")[0]
    averaged = engine.evaluate(plain, plain.to_device(engine.stack([swapped])),
                               engine.put_eval_splits({"x": split}, 50, plain), "x")[0]
    assert with_ema["loss"] == pytest.approx(averaged["loss"], rel=1e-5)
    assert with_ema["loss"] != pytest.approx(raw["loss"], rel=1e-5)


def test_flip_test_time_augmentation_averages_both_views(tiny_config, shared_engine):
    config = _small(tiny_config, tta_flip=True)
    programs = shared_engine.programs(engine.static_spec(config, 48))
    state = programs.init_state(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    tta = engine.eval_logits(state, x, programs.spec)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    plain = state.apply_fn(variables, x, train=False)
    mirrored = state.apply_fn(variables, x[:, :, ::-1, :], train=False)
    np.testing.assert_allclose(tta, 0.5 * (plain + mirrored), rtol=1e-5, atol=1e-6)
    # Averaging the two views makes the prediction invariant to mirroring the input.
    np.testing.assert_allclose(engine.eval_logits(state, x[:, :, ::-1, :], programs.spec), tta,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, mirrored)


def test_interrupted_pack_resumes_every_member_exactly(tiny_config, tmp_path):
    """A pack stopped mid-epoch (as SIGTERM would) and run again ends bit-identical to the
    same pack run straight through: every member's checkpoint, metrics and result."""
    shared = engine.Engine()
    configs = [_small(tiny_config, learning_rate=lr, keep_full_checkpoints=True)
               for lr in (0.001, 0.002)]
    straight = train.train_pack(configs, [str(tmp_path / f"s{i}") for i in range(2)],
                                engine=shared)
    stepped = [str(tmp_path / f"p{i}") for i in range(2)]
    for c in configs:
        c.log_every_steps = 1  # chunks of one step, so the stop lands mid-epoch
    with pytest.raises(train.Preempted, match="at step 4 .*the 2 trial directories"):
        train.train_pack(configs, stepped, engine=shared, stop_requested=lambda s: s == 4)
    assert [json.load(open(os.path.join(d, "result.json")))["status"] for d in stepped] == [
        "preempted", "preempted"]
    resumed = train.train_pack(configs, stepped, engine=shared)
    drop = ("train_time_s", "images_per_sec", "epoch_time_s")
    for a, b, i in zip(straight, resumed, range(2)):
        assert {k: v for k, v in a.items() if k not in drop} == \
               {k: v for k, v in b.items() if k not in drop}
        strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
        assert strip(_records(str(tmp_path / f"s{i}"))) == strip(_records(stepped[i]))
