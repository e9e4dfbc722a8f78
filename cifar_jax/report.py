"""The study's report: results table, best configuration per model, statistics, plots.

  python -m cifar_jax.report --workdir runs/grid

Aggregates whatever trials have finished (any number of processes may have written them).
Per model it selects the configuration with the best mean validation accuracy over the grid's
seeds (ties: lower validation loss), says whether it beats the runner-up by more than the seed
noise, evaluates the test split on the selected configuration's best weights only (every seed
of it, including `config.grid.repeat_selected_seeds`), and writes results.csv, summary.md and
plots/. Several processes finishing at once write one consistent report: the report holds a
lock while it works, writes every file atomically, and a selected trial's test evaluation is
kept in its result.json, so it happens once.
"""

import csv
import dataclasses
import io
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
from absl import logging

from cifar_jax import datasets, input_pipeline, metric_writing, trials as trials_lib
from cifar_jax import workdir as workdir_lib
from cifar_jax.trials import Trial

PUBLISHED_EPOCHS = 10
PUBLISHED_BEST_VAL = {"resnet18": 0.88, "alexnet": 0.74, "mobilenetv2": 0.80}
HYPERPARAMETERS = ("optimizer", "learning_rate", "weight_decay", "augmentation", "dropout_rate",
                   "label_smoothing", "warmup_epochs", "ema_decay")
CSV_COLUMNS = ("framework", "model", "name", "optimizer", "learning_rate", "weight_decay",
               "augmentation", "dropout_rate", "label_smoothing", "warmup_epochs", "ema_decay",
               "seed", "num_epochs", "status", "best_val_accuracy", "best_epoch",
               "best_val_loss", "final_val_accuracy", "final_val_loss", "test_accuracy",
               "selected", "num_params", "train_time_s", "images_per_sec", "pack_size",
               "error")


# ----------------------------------------------------------------------------------------------
# Rows and selection.


def collect(workdir: str, trials: Sequence[Trial]) -> List[Dict[str, Any]]:
    """One row per trial: its hyperparameters, status and result fields."""
    rows = []
    for t in trials:
        status = trials_lib.trial_status(workdir, t)
        result = {}
        if status not in ("unreadable", "mismatched"):
            result = workdir_lib.read_result(os.path.join(workdir, t.relpath)) or {}
        row = {key: result.get(key) for key in CSV_COLUMNS}
        if result.get("best_epoch"):
            row["best_val_loss"] = _val_loss_at(os.path.join(workdir, t.relpath),
                                                result["best_epoch"])
        row.update(t.hyperparameters(), name=t.name, trial=t, status=status,
                   selected=bool(result.get("selected")))
        if not row["selected"]:  # the test split is reported for selected trials only
            row["test_accuracy"] = None
        if status == "mismatched":
            row["error"] = trials_lib.mismatch(
                t, workdir_lib.read_result(os.path.join(workdir, t.relpath)))
        elif status == "unreadable":
            row["error"] = f"{t.relpath}/result.json is not valid JSON"
        rows.append(row)
    return rows


def _val_loss_at(directory: str, epoch: int) -> Optional[float]:
    """The validation loss of one epoch, from the trial's metrics.jsonl (the selection's
    tie-break: the loss that goes with the best epoch's accuracy)."""
    try:
        record = workdir_lib.epoch_record(os.path.join(directory, "metrics.jsonl"), epoch)
    except workdir_lib.WorkdirError:
        return None
    return (record or {}).get("val_loss")


@dataclasses.dataclass
class Configuration:
    """The trials of one model and hyperparameter setting that differ only in seed."""

    model: str
    name: str
    rows: List[Dict[str, Any]]  # completed trials of the grid's own seeds

    def values(self, key: str) -> List[float]:
        return [r[key] for r in self.rows if r.get(key) is not None]

    @property
    def mean_val(self) -> float:
        return statistics.mean(self.values("best_val_accuracy"))

    @property
    def mean_val_loss(self) -> float:
        """At the best epoch."""
        losses = self.values("best_val_loss")
        return statistics.mean(losses) if losses else math.inf


def configurations(rows) -> Dict[str, List[Configuration]]:
    """Per model, the configurations whose every grid seed completed, best first. A seed that
    diverged or failed rules its configuration out: the mean of the survivors would flatter an
    unstable setting. Ties go to the lower validation loss at the best epoch."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["trial"].config_name), []).append(r)
    out: Dict[str, List[Configuration]] = {}
    for (model, name), members in groups.items():
        if all(r["status"] == "completed" and r["best_val_accuracy"] is not None
               for r in members):
            out.setdefault(model, []).append(Configuration(model, name, members))
    for configs in out.values():
        configs.sort(key=lambda c: (-c.mean_val, c.mean_val_loss))
    return out


def split_by_finished(ranked: Dict[str, List[Configuration]], rows) -> Tuple[
        Dict[str, Configuration], Dict[str, Configuration]]:
    """Each model's best configuration: selected where all of the model's grid trials have
    finished; a provisional leader where some are still to run (or running), which is never
    test-evaluated (nor selected from by another run)."""
    still_open = {r["model"] for r in rows if r["status"] in trials_lib.UNFINISHED}
    best = {m: cs[0] for m, cs in ranked.items() if m not in still_open}
    return best, {m: cs[0] for m, cs in ranked.items() if m in still_open}


def mean_std(values: Sequence[float]) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pooled_std(*groups: Sequence[float]) -> Optional[float]:
    """The pooled standard deviation of several samples (None without any repeats)."""
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if not dof:
        return None
    return math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) > 1)
                     / dof)


def margin_text(best: Configuration, runner_up: Optional[Configuration],
                best_seeds: Sequence[float]) -> str:
    """Whether the selected configuration beats the runner-up by more than the seed noise."""
    if runner_up is None:
        return "no runner-up (one configuration completed)"
    diff = 100 * (best.mean_val - runner_up.mean_val)
    noise = pooled_std(list(best_seeds), runner_up.values("best_val_accuracy"))
    head = f"beats {runner_up.name} by {diff:.2f} pp of mean best val accuracy"
    if noise is None:
        return head + "; seed noise unknown (one seed each: rerun with several seeds)"
    verdict = "more than" if diff > 100 * noise else "within"
    return head + f"; seed noise (pooled std) {100 * noise:.2f} pp: {verdict} the noise"


# ----------------------------------------------------------------------------------------------
# Test evaluation of the selected configurations.


def _evaluate_test(workdir: str, row, dataset) -> float:
    """The test accuracy of a selected trial's kept weights (its best epoch's), from one pass
    over the test split that also writes the trial's evaluation in depth (evaluation/test/);
    kept in its result.json and written to its TensorBoard events. Trials of the PyTorch twin
    are evaluated through the same Flax forward pass, their weights converted."""
    from cifar_jax import evaluation, inference

    directory = os.path.join(workdir, row["trial"].relpath)
    trained = inference.load_run(directory, f"{row['model']}/{row['name']} of the grid in "
                                            f"{workdir}")
    e = evaluation.evaluate_split(trained, dataset.test, "test", inference.Predictor(trained))
    result = workdir_lib.read_result(directory)
    result.update(selected=True, test_accuracy=e.accuracy, test_loss=e.nll)
    workdir_lib.write_result(directory, result)
    writer = metric_writing.create_writer(directory)
    writer.write_scalars(result.get("step") or 0, {"test/loss": e.nll,
                                                   "test/accuracy": e.accuracy})
    writer.close()
    logging.info("Selected %s/%s: test accuracy %.2f%% (best weights)", row["model"],
                 row["name"], 100 * e.accuracy)
    return e.accuracy


def _mark_selected(workdir, config, rows, selected: Dict[str, List[Dict[str, Any]]],
                   dataset) -> None:
    """Test-evaluates the selected trials (once: the result is kept in result.json) and
    unmarks trials selected by an earlier report, when fewer trials had finished."""
    chosen = {id(r) for rs in selected.values() for r in rs}
    for r in rows:
        directory = os.path.join(workdir, r["trial"].relpath)
        if id(r) in chosen:
            if r["selected"] and r["test_accuracy"] is not None:
                continue  # evaluated by an earlier report
            if dataset is None:
                dataset = input_pipeline.load_dataset(config.data)
            try:
                r["test_accuracy"] = _evaluate_test(workdir, r, dataset)
                r["selected"] = True
            except Exception as e:  # noqa: BLE001 - one trial's files must not sink the report
                r["error"] = f"test evaluation failed: {type(e).__name__}: {e}"
                logging.error("%s/%s: %s", r["model"], r["name"], r["error"])
        elif r["selected"]:
            result = workdir_lib.read_result(directory)
            result["selected"] = False
            result.pop("test_accuracy", None)  # the test split is for selected trials only
            result.pop("test_loss", None)
            workdir_lib.write_result(directory, result)
            r["selected"], r["test_accuracy"] = False, None


def best_configurations(workdir: str, config) -> Dict[str, Configuration]:
    """Per model whose grid trials have all finished, its selected configuration."""
    rows = collect(workdir, trials_lib.expand(config))
    return split_by_finished(configurations(rows), rows)[0]


def repeat_trials(config, best: Dict[str, Configuration]) -> List[Trial]:
    """The selected configuration of each model with grid.repeat_selected_seeds (those not
    already among the grid's own trials)."""
    grid_trials = trials_lib.expand(config)
    known = {(t.model, t.values) for t in grid_trials}
    out: List[Trial] = []
    for c in best.values():
        base = c.rows[0]["trial"]
        for seed in trials_lib.repeat_seeds(config):
            values = tuple((k, seed if k == "seed" else v) for k, v in base.values)
            if (base.model, values) not in known:
                known.add((base.model, values))
                out.append(Trial(len(grid_trials) + len(out), base.model, values))
    return out


# ----------------------------------------------------------------------------------------------
# summary.md


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def pct_std(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return ""
    return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def epochs_text(rows) -> str:
    """How long the finished trials trained, as the summary states it."""
    epochs = sorted({int(r["num_epochs"]) for r in rows
                     if r["status"] == "completed" and r.get("num_epochs") is not None})
    if not epochs:
        return "No trial has finished yet."
    if len(epochs) > 1:
        return (f"The finished trials trained for **different numbers of epochs** "
                f"({', '.join(map(str, epochs))}): compare them with care.")
    note = ("" if epochs[0] == PUBLISHED_EPOCHS else
            f" That is not the study's {PUBLISHED_EPOCHS}: these accuracies are not comparable "
            "with the published ones.")
    return f"Every trial trained for **{epochs[0]} epochs**.{note}"


def summary_markdown(rows, best: Dict[str, Configuration], selected, runner_up,
                     leaders: Optional[Dict[str, Configuration]] = None,
                     evaluations: Sequence[Tuple[str, str]] = (),
                     info: datasets.DatasetInfo = datasets.CIFAR10) -> str:
    """summary.md of a grid on `info`'s data set; `evaluations`: (label, path relative to the
    grid workdir) of the selected trials' evaluations in depth."""
    published = info == datasets.CIFAR10  # the study's figures are CIFAR-10's
    lines = [f"# Summary of best hyperparameters ({info.title})", "",
             epochs_text(rows) + (f" The published figures are the study's best validation "
                                  f"accuracy after {PUBLISHED_EPOCHS} epochs." if published
                                  else "") +
             " Accuracies are mean ± standard deviation over seeds where there are several; "
             "with data.val_size=0 the 'val' figures are training accuracy.", "",
             "| model | optimizer | lr | weight decay | augmentation | dropout | seeds | best val "
             "acc | test acc |" + (f" published best val acc ({PUBLISHED_EPOCHS} epochs) |"
                                   if published else ""),
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
             + (" ---: |" if published else "")]
    for model, c in best.items():
        r, sel = c.rows[0], selected[model]
        lines.append(
            f"| {model} | {r['optimizer']} | {r['learning_rate']:g} | {r['weight_decay']:g} | "
            f"{r['augmentation']} | {'' if r['dropout_rate'] is None else r['dropout_rate']} | "
            f"{len(sel)} | {pct_std([s['best_val_accuracy'] for s in sel])} | "
            f"{pct_std([s['test_accuracy'] for s in sel])} |"
            + (f" {_pct(PUBLISHED_BEST_VAL.get(model))} |" if published else ""))
    if evaluations:
        lines += ["", "Evaluation in depth on the test split (per-class precision and recall, "
                  "calibration, confusion matrix, most confident mistakes): " + ", ".join(
                      f"[{label}]({path})" for label, path in evaluations) + "."]
    lines += ["", "Selection margin (means over the grid's seeds; the noise from every seed run "
              "of the selected configuration and the runner-up):", ""]
    for model, c in best.items():
        seeds = [s["best_val_accuracy"] for s in selected[model]]
        lines.append(f"- {model}: {c.name} {margin_text(c, runner_up.get(model), seeds)}.")
    for model, c in (leaders or {}).items():
        left = sum(r["model"] == model and r["status"] in trials_lib.UNFINISHED
                   for r in rows)
        lines.append(f"- {model}: provisional leader {c.name} ({100 * c.mean_val:.2f}% mean "
                     f"best val); {left} trials still to finish, so nothing is selected or "
                     "test-evaluated yet.")
    counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    lines += ["", "Trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    lines += _effects_markdown([r for r in rows if not r.get("repeat")])
    return "\n".join(lines) + "\n"


def _effects_markdown(rows) -> List[str]:
    lines = ["# Effect of each hyperparameter", "",
             "Best validation accuracy over the completed trials with each value: mean ± "
             "standard deviation (n = number of trials).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        done = [r for r in rows if r["model"] == model and r["status"] == "completed"]
        if not done:
            continue
        lines += [f"## {model}", "", "| hyperparameter | value | best val acc | n |",
                  "| --- | --- | ---: | ---: |"]
        for hp in HYPERPARAMETERS:
            values = sorted({r[hp] for r in done if r[hp] is not None}, key=str)
            if len(values) < 2:
                continue
            for v in values:
                accs = [r["best_val_accuracy"] for r in done if r[hp] == v]
                lines.append(f"| {hp} | {v} | {pct_std(accs)} | {len(accs)} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# The report.


def write_report(workdir: str, config: ml_collections.ConfigDict,
                 dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    """Writes results.csv, summary.md and plots/ for whatever has finished in `workdir`."""
    from cifar_jax import plots

    lock = workdir_lib.RunLock(workdir, "report.lock", guard_directory=False)
    lock.try_acquire(blocking=True)  # one report at a time; the next one sees its results
    try:
        rows = collect(workdir, trials_lib.expand(config))
        ranked = configurations(rows)
        best, leaders = split_by_finished(ranked, rows)
        runner_up = {m: cs[1] for m, cs in ranked.items() if len(cs) > 1}
        rows += [dict(r, repeat=True) for r in collect(workdir, repeat_trials(config, best))]
        selected = {m: [r for r in rows if r["status"] == "completed" and r["model"] == m
                        and r["trial"].config_name == c.name] for m, c in best.items()}
        _mark_selected(workdir, config, rows, selected, dataset)
        info = datasets.of_config(config)
        _write_csv(os.path.join(workdir, "results.csv"), rows)
        workdir_lib.write_text_atomic(
            os.path.join(workdir, "summary.md"),
            summary_markdown(rows, best, selected, runner_up, leaders,
                             _evaluations(workdir, selected), info))
        plots.write_plots(workdir, rows, best, selected, config.grid.default_trial, info.title)
    finally:
        lock.release()
    logging.info("Report: %s/results.csv, summary.md, plots/", workdir)
    return {"rows": rows, "best": best, "selected": selected}


def _evaluations(workdir: str, selected) -> List[Tuple[str, str]]:
    """(label, relative path) of each selected trial's test evaluation that exists."""
    out = []
    for model, rows in selected.items():
        for r in rows:
            path = os.path.join(r["trial"].relpath, "evaluation", "test", "summary.md")
            if os.path.exists(os.path.join(workdir, path)):
                out.append((f"{model}, seed {dict(r['trial'].values).get('seed', 0)}", path))
    return out


def _write_csv(path: str, rows) -> None:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    workdir_lib.write_text_atomic(path, out.getvalue())


def main(argv):
    from absl import flags

    from cifar_jax import cli

    del argv
    workdir = flags.FLAGS.workdir
    cli.check_workdir_flag(workdir)
    stored = workdir_lib.read_json_object(os.path.join(workdir, "grid_config.json"))
    if stored is None:
        raise cli.UsageError(f"{workdir}/grid_config.json not found: is {workdir!r} a grid "
                             "workdir? Give the --workdir of a grid run.")
    write_report(workdir, ml_collections.ConfigDict(stored))
    with open(os.path.join(workdir, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    from absl import flags

    from cifar_jax import cli

    # Flags only when run as a program: the grid imports this module beside main's flags.
    flags.DEFINE_string("workdir", None, "A grid's workdir (holds grid_config.json).")
    flags.mark_flag_as_required("workdir")
    cli.run(main)
