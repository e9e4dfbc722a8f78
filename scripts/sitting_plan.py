"""Which models' grids fit in what is left of a GPU sitting, from the sitting's bench.

  python3 scripts/sitting_plan.py --bench_json B --seconds_left S --candidates M1,M2 \
      [--config configs/grid.py --config.FIELD=VALUE ...]

Prints one line per model that fits, in the given order of preference: `MODEL PACK_SIZE
PROJECTED_SECONDS`. A model's grid must end inside the sitting (its selection, its test
evaluation and its repeat seeds need its weights, which cannot travel back), so a model is
taken only when its projection fits in the time the models before it leave. The projection is
the bench's (`cifar_jax.bench.projected_grid_seconds` at the fastest float32 on-device-loop pack
size, compile included) for the config's trials of that model and its
`grid.repeat_selected_seeds`, times MARGIN, plus START_SECONDS. Models the bench did not reach
or that do not fit are passed over, and said so on stderr.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import bench, trials as trials_lib  # noqa: E402

MARGIN = 1.4  # checkpoints, per-epoch validation and the report are not in the bench's step rate
START_SECONDS = 45  # a grid process: imports, reading the JPEG archive, the report at the end

flags.DEFINE_string("bench_json", None, "The sitting's bench (cifar_jax.bench --out).")
flags.DEFINE_float("seconds_left", None, "Seconds the study may take.")
flags.DEFINE_list("candidates", "resnet18,alexnet,mobilenetv2",
                  "The study's models, in order of preference.")
config_flags.DEFINE_config_file("config", "configs/grid.py", "The grid the study runs.")


def projected_seconds(row, study, repeats: int) -> float:
    """The model's grid and its repeat seeds at the row's speed, with the margin."""
    grid = bench.projected_grid_seconds(row, study)
    trials = study["trials"][row["model"]]
    with_repeats = row["first_step_cold_s"] + (grid - row["first_step_cold_s"]) * (
        (trials + repeats) / trials)
    return MARGIN * with_repeats + START_SECONDS


def plan(rows, seconds_left: float, models, repeats: int, study):
    """[(model, pack size, projected seconds)] of the models that fit, in order."""
    chosen = []
    for model in models:
        measured = [r for r in rows if r["framework"] == "jax" and r["model"] == model
                    and r["dtype"] == "float32" and r["variant"] == "loop"]
        if not measured or not study["trials"].get(model):
            print(f"{model}: not in the bench or not in the grid; not run", file=sys.stderr)
            continue
        best = min(measured, key=lambda r: projected_seconds(r, study, repeats))
        seconds = projected_seconds(best, study, repeats)
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
    try:
        with open(flags.FLAGS.bench_json) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"no bench results in {flags.FLAGS.bench_json} ({e}); no model is run",
              file=sys.stderr)
        return
    models = [m for m in flags.FLAGS.candidates if m]
    config.grid.models = ",".join(models)  # the study's trials of every candidate
    repeats = len(trials_lib.repeat_seeds(config))
    for model, pack_size, seconds in plan(rows, flags.FLAGS.seconds_left, models, repeats,
                                          bench.study_shape(config)):
        print(model, pack_size, round(seconds))


if __name__ == "__main__":
    flags.mark_flags_as_required(["bench_json", "seconds_left"])
    app.run(main)
