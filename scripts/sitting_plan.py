"""Which models' grids fit in what is left of a GPU sitting, from the sitting's bench.

  python3 scripts/sitting_plan.py --bench_json B --seconds_left S --candidates M1,M2 \
      [--config configs/grid.py --config.FIELD=VALUE ...]

Prints `done MODEL` for each model whose grid and repeat seeds have all finished in
--grid_workdir (an earlier sitting's, carried), then `run MODEL PACK_SIZE PROJECTED_SECONDS`
for each other model that fits, in the given order of preference. A model's grid must end
inside the sitting (its selection, its test evaluation and its repeat seeds need its weights,
which cannot travel back), so a model is taken only when its projection fits in the time the
models before it leave. The projection is the bench's (`cifar_jax.bench.projected_grid_seconds`
at the fastest float32 on-device-loop pack size, compile included) for the config's trials of
that model and its `grid.repeat_selected_seeds`, times MARGIN, plus each trial's epoch-end
checkpoints, plus START_SECONDS. Models the bench did not reach or that do not fit are passed
over, and said so on stderr.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import bench, report, trials as trials_lib  # noqa: E402

MARGIN = 1.1  # host syncs and epoch-end validation beyond the bench's timed chunks
START_SECONDS = 45  # a grid process: imports, reading the JPEG archive, the report at the end
# Epoch-end checkpoints (parameters and up to two optimizer moments, float32) written per second.
# The H200 sitting of 2026-11-30: AlexNet's packs of 4 spent 33 s for 17 s of training, the
# rest mostly 10 saves of 4 x 266 MB: about 0.67 GB/s.
CHECKPOINT_BYTES_PER_S = 0.67e9

flags.DEFINE_string("bench_json", "", "The sitting's bench (cifar_jax.bench --out).")
flags.DEFINE_float("seconds_left", 0.0, "Seconds the study may take.")
flags.DEFINE_list("candidates", "resnet18,alexnet,mobilenetv2",
                  "The study's models, in order of preference.")
flags.DEFINE_string("grid_workdir", None, "The study's grid workdir, if it exists.")
flags.DEFINE_bool("finished_only", False, "Print only the `done MODEL` lines (no bench needed).")
config_flags.DEFINE_config_file("config", "configs/grid.py", "The grid the study runs.")


def projected_seconds(row, study, repeats: int, params: int) -> float:
    """The model's grid and its repeat seeds at the row's speed, with the margin and the
    checkpoints of a model of `params` parameters."""
    grid = bench.projected_grid_seconds(row, study)
    trials = study["trials"][row["model"]] + repeats
    with_repeats = row["first_step_cold_s"] + (grid - row["first_step_cold_s"]) * (
        trials / study["trials"][row["model"]])
    checkpoints = trials * study["epochs"] * 3 * 4 * params / CHECKPOINT_BYTES_PER_S
    return MARGIN * with_repeats + checkpoints + START_SECONDS


def finished_models(workdir, config, models):
    """The models whose grid trials and repeat seeds have all finished in `workdir`, and whose
    selected trials have their test accuracy (the weights behind it do not travel)."""
    if not workdir or not os.path.isdir(workdir):
        return []
    best = report.best_configurations(workdir, config)  # models whose grid has finished
    rows = report.collect(workdir, trials_lib.expand(config) + report.repeat_trials(config, best))

    def done(model):
        mine = [r for r in rows if r["model"] == model]
        selected = [r for r in mine if r["trial"].config_name == best[model].name]
        return (all(r["status"] in ("completed", "diverged") for r in mine)
                and all(r["test_accuracy"] is not None for r in selected
                        if r["status"] == "completed"))

    return [m for m in models if m in best and done(m)]


def plan(rows, seconds_left: float, models, repeats: int, study, params):
    """[(model, pack size, projected seconds)] of the models that fit, in order."""
    chosen = []
    for model in models:
        measured = [r for r in rows if r["framework"] == "jax" and r["model"] == model
                    and r["dtype"] == "float32" and r["variant"] == "loop"]
        if not measured or not study["trials"].get(model):
            print(f"{model}: not in the bench or not in the grid; not run", file=sys.stderr)
            continue
        best = min(measured, key=lambda r: projected_seconds(r, study, repeats, params[model]))
        seconds = projected_seconds(best, study, repeats, params[model])
        if seconds <= seconds_left:
            chosen.append((model, best["pack_size"], seconds))
            seconds_left -= seconds
        else:
            print(f"{model}: projected {seconds:.0f} s (pack of {best['pack_size']}), "
                  f"{seconds_left:.0f} s left; not run", file=sys.stderr)
    return chosen


def main(argv):
    del argv
    config = flags.FLAGS.config
    models = [m for m in flags.FLAGS.candidates if m]
    config.grid.models = ",".join(models)  # the study's trials of every candidate
    done = finished_models(flags.FLAGS.grid_workdir, config, models)
    for model in done:
        print("done", model)
    if flags.FLAGS.finished_only:
        return
    try:
        with open(flags.FLAGS.bench_json) as f:
            measured = json.load(f)
        rows, params = measured["rows"], {m: i["params"] for m, i in measured["models"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"no bench results in {flags.FLAGS.bench_json} ({e}); no model is run",
              file=sys.stderr)
        return
    todo = [m for m in models if m not in done]
    for model, pack_size, seconds in plan(rows, flags.FLAGS.seconds_left, todo,
                                          len(trials_lib.repeat_seeds(config)),
                                          bench.study_shape(config), params):
        print("run", model, pack_size, round(seconds))

if __name__ == "__main__":
    app.run(main)
