"""Publishes finished grids into the repository: results/<name>/ and README's Results section.

  python -m cifar_jax.publish --out results/2026-12-01-h200 --jax_grid runs/grid \
      [--torch_grid runs/grid_torch] [--recipe runs/recipe] [--bench bench.json] \
      [--run_log run_log.json] [--readme README.md]

Copies what a reader needs (each grid's results.csv and summary.md, the JAX grid's plots, the
speed table) and writes seeds.md (test accuracy of each selected configuration, mean and std
over its seeds, JAX beside the PyTorch twin), REPRODUCE.md (commands, package versions, device,
wall times, from --run_log) and, with --readme, regenerates the README's Results section from
those files (between `<!-- results:start -->` and `<!-- results:end -->`), so the numbers in
the README are never typed by hand.
"""

import csv
import os
import shutil
from typing import Any, Dict, List, Optional

from absl import flags, logging

from cifar_jax import cli, report, trials as trials_lib, workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "The results directory to write, e.g. results/2026-12-01-h200.")
flags.DEFINE_string("jax_grid", None, "Workdir of the study's grid run with JAX.")
flags.DEFINE_string("torch_grid", None, "Workdir of the same grid (or its selected "
                    "configurations) run with the PyTorch twin.")
flags.DEFINE_string("recipe", None, "Workdir of configs/recipe.py (beyond the study).")
flags.DEFINE_string("bench", None, "JSON written by `python -m cifar_jax.bench --out`.")
flags.DEFINE_string("run_log", None, "JSON with 'commands' (list), 'wall_times' (name -> s), "
                    "'versions' and 'device', as scripts/gpu_study.sh writes it.")
flags.DEFINE_string("readme", None, "README.md whose Results section to regenerate.")
flags.mark_flags_as_required(["out", "jax_grid"])

START, END = "<!-- results:start -->", "<!-- results:end -->"
# The study's published best configuration per model, where this project records it.
PUBLISHED_BEST_CONFIG = {"resnet18": "adam_lr0.001_wd1e-4_basic"}


def read_rows(grid_workdir: str) -> List[Dict[str, str]]:
    path = os.path.join(grid_workdir, "results.csv")
    if not os.path.exists(path):
        raise cli.UsageError(f"{path} not found: run the grid (or cifar_jax.report) there first.")
    with open(path) as f:
        return list(csv.DictReader(f))


def _pct(values: List[float]) -> str:
    """The report's mean ± std, with the number of seeds where there are several."""
    if not values:
        return "–"
    return report.pct_std(values) + (f" (n={len(values)})" if len(values) > 1 else "")


def selected(rows: List[Dict[str, str]]) -> Dict[str, Dict[str, Any]]:
    """Per model: the selected configuration, its val and test accuracies over seeds."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["selected"] != "True":
            continue
        entry = out.setdefault(r["model"], {"name": r["name"].split("_seed")[0], "val": [],
                                            "test": [], "row": r})
        entry["val"].append(float(r["best_val_accuracy"]))
        if r["test_accuracy"]:
            entry["test"].append(float(r["test_accuracy"]))
    return out


def seeds_markdown(jax_sel, torch_sel) -> str:
    lines = ["| model | framework | selected configuration | best val acc | test acc |",
             "| --- | --- | --- | ---: | ---: |"]
    for model, e in jax_sel.items():
        lines.append(f"| {model} | JAX | {e['name']} | {_pct(e['val'])} | {_pct(e['test'])} |")
        t = torch_sel.get(model)
        if t:
            lines.append(f"| {model} | PyTorch twin | {t['name']} | {_pct(t['val'])} | "
                         f"{_pct(t['test'])} |")
    return "\n".join(lines) + "\n"


def data_note(source: str) -> str:
    if "jpeg" in source.lower():
        return ("the JPEG quality-75 re-encoding of CIFAR-10, which runs slightly below the "
                "original files")
    return f"data source `{source}`"


def results_section(out_rel: str, jax_sel, torch_sel, recipe_sel, bench_table: Optional[str],
                    epochs: str, source: str) -> str:
    lines = [START, "## Results", "",
             f"Produced by this code (files in [`{out_rel}`]({out_rel}), commands and versions in "
             f"[`REPRODUCE.md`]({out_rel}/REPRODUCE.md)). {epochs}-epoch trials on "
             f"{data_note(source)}; the study's figures are best validation accuracy after 10 "
             "epochs on the original data. Mean ± std over seeds (n).", "",
             "| model | published best val (config) | ours, JAX: selected config | val | test "
             "| ours, PyTorch twin: val | test | selection agrees with the study |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for model, e in jax_sel.items():
        published = report.PUBLISHED_BEST_VAL.get(model)
        config = PUBLISHED_BEST_CONFIG.get(model)
        t = torch_sel.get(model, {"val": [], "test": []})
        agrees = "not recorded" if config is None else ("yes" if e["name"] == config else "no")
        lines.append(
            f"| {model} | {'' if published is None else f'{100 * published:.0f}%'} "
            f"({config or 'not recorded here'}) | {e['name']} | {_pct(e['val'])} | "
            f"{_pct(e['test'])} | {_pct(t['val'])} | {_pct(t['test'])} | {agrees} |")
    if recipe_sel:
        lines += ["", "### Beyond the study (configs/recipe.py)", "",
                  "| model | study recipe: test | this recipe: test |", "| --- | ---: | ---: |"]
        for model, e in recipe_sel.items():
            study = jax_sel.get(model, {"test": []})
            lines.append(f"| {model} | {_pct(study['test'])} | {_pct(e['test'])} |")
    if bench_table:
        lines += ["", "### Speed", "", bench_table]
    lines += ["", END]
    return "\n".join(lines)


def replace_section(readme: str, section: str) -> str:
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        return head + section + rest.split(END, 1)[1]
    return readme.rstrip("\n") + "\n\n" + section + "\n"


def reproduce_markdown(run_log: Dict[str, Any]) -> str:
    lines = ["# How these results were produced", "",
             f"Device: {run_log.get('device', 'not recorded')}", "", "Versions:", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(run_log.get("versions", {}).items())]
    lines += ["", "Commands, in order:", "", "```bash", *run_log.get("commands", []), "```", "",
              "Wall times:", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in run_log.get("wall_times", {}).items()]
    return "\n".join(lines) + "\n"


def copy_grid(workdir: str, out: str, prefix: str, plots: bool) -> None:
    for name in ("results.csv", "summary.md"):
        shutil.copy(os.path.join(workdir, name), os.path.join(out, prefix + name))
    if plots and os.path.isdir(os.path.join(workdir, "plots")):
        shutil.copytree(os.path.join(workdir, "plots"), os.path.join(out, "plots"),
                        dirs_exist_ok=True)


def _read_input(path: Optional[str], kind: type, what: str):
    """A JSON input file, checked before anything is written."""
    if path is None:
        return None
    try:
        value = workdir_lib.read_json(path)
    except workdir_lib.WorkdirError as e:
        raise cli.UsageError(f"--{what}: {e}") from e
    if not isinstance(value, kind):
        raise cli.UsageError(f"--{what}={path!r} does not hold a JSON {kind.__name__} "
                             f"({'missing' if value is None else type(value).__name__}).")
    return value


def main(argv):
    del argv
    out = FLAGS.out
    bench = _read_input(FLAGS.bench, dict, "bench")
    run_log = _read_input(FLAGS.run_log, dict, "run_log")
    if bench is not None and not isinstance(bench.get("table"), str):
        raise cli.UsageError(f"--bench={FLAGS.bench!r} has no 'table': write it with "
                             "`python -m cifar_jax.bench --out`.")
    if FLAGS.readme and not os.path.isfile(FLAGS.readme):
        raise cli.UsageError(f"--readme={FLAGS.readme!r} is not a file.")
    jax_rows = read_rows(FLAGS.jax_grid)
    torch_rows = read_rows(FLAGS.torch_grid) if FLAGS.torch_grid else []
    recipe_rows = read_rows(FLAGS.recipe) if FLAGS.recipe else []
    jax_sel, torch_sel, recipe_sel = selected(jax_rows), selected(torch_rows), selected(
        recipe_rows)
    if not jax_sel:
        raise cli.UsageError(f"--jax_grid={FLAGS.jax_grid!r} selects no configuration yet: a "
                             "model is selected once all of its grid trials have finished.")
    pending = sum(r["status"] in trials_lib.UNFINISHED for r in jax_rows)
    if pending:
        logging.warning("%s: %d trials have not finished; publishing the models that have.",
                        FLAGS.jax_grid, pending)
    os.makedirs(out, exist_ok=True)
    copy_grid(FLAGS.jax_grid, out, "", plots=True)
    if FLAGS.torch_grid:
        copy_grid(FLAGS.torch_grid, out, "torch_", plots=False)
    if FLAGS.recipe:
        copy_grid(FLAGS.recipe, out, "recipe_", plots=False)
    workdir_lib.write_text_atomic(os.path.join(out, "seeds.md"),
                                  seeds_markdown(jax_sel, torch_sel))
    bench_table = bench["table"] if bench else None
    if bench_table:
        workdir_lib.write_text_atomic(os.path.join(out, "bench.md"), bench_table + "\n")
    if run_log is not None:
        workdir_lib.write_text_atomic(os.path.join(out, "REPRODUCE.md"),
                                      reproduce_markdown(run_log))
    if FLAGS.readme:
        grid_config = workdir_lib.read_json_object(
            os.path.join(FLAGS.jax_grid, "grid_config.json")) or {}
        epochs = str(grid_config.get("num_epochs", jax_rows[0].get("num_epochs") or "?"))
        source = grid_config.get("data", {}).get("source", "?")
        section = results_section(os.path.relpath(out, os.path.dirname(os.path.abspath(
            FLAGS.readme))), jax_sel, torch_sel, recipe_sel, bench_table, epochs, source)
        with open(FLAGS.readme) as f:
            readme = f.read()
        workdir_lib.write_text_atomic(FLAGS.readme, replace_section(readme, section))
    print(f"Published to {out}" + (f" and {FLAGS.readme}" if FLAGS.readme else ""))


if __name__ == "__main__":
    cli.run(main)
