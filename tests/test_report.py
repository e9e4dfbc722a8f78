"""The report from trial directories written by hand: statistics, summary, figure contents."""

import collections
import csv
import os

import pytest

from cifar_jax import plots, report, trials, workdir as workdir_lib


def _grid(**fields):
    from configs import grid as grid_config

    c = grid_config.get_config()
    c.num_epochs = 3
    c.grid.models = "alexnet"
    c.grid.optimizer, c.grid.weight_decay, c.grid.augmentation = "sgd,adam", "1e-4", "basic"
    c.grid.learning_rate, c.grid.dropout_rate = "0.01", "0.5"
    for k, v in fields.items():
        c.grid[k] = v
    return c


def _fake_trial(workdir, trial, val_curve, test=None):
    directory = os.path.join(workdir, trial.relpath)
    os.makedirs(directory)
    for epoch, acc in enumerate(val_curve, 1):
        workdir_lib.append_jsonl(os.path.join(directory, "metrics.jsonl"),
                                 {"epoch": epoch, "step": 10 * epoch, "val_accuracy": acc,
                                  "val_loss": 1 - acc})
    result = {"status": "completed", "framework": "jax", **trial.hyperparameters(),
              "best_val_accuracy": max(val_curve), "final_val_loss": 1 - val_curve[-1],
              "num_params": 1000, "images_per_sec": 100.0, "step": 30, "num_epochs": 3}
    if test is not None:
        result.update(selected=True, test_accuracy=test)
    workdir_lib.write_result(directory, result)


@pytest.fixture
def seeded_workdir(tmp_path):
    """sgd: 3 seeds around 0.60; adam: 3 seeds around 0.59 (within the noise)."""
    c = _grid(seeds="0,1,2")
    curves = {("sgd", 0): 0.61, ("sgd", 1): 0.59, ("sgd", 2): 0.60,
              ("adam", 0): 0.58, ("adam", 1): 0.60, ("adam", 2): 0.59}
    for t in trials.expand(c):
        v = dict(t.values)
        best = curves[(v["optimizer"], v["seed"])]
        _fake_trial(str(tmp_path), t, [best - 0.2, best - 0.05, best], test=best - 0.01)
    return c, str(tmp_path)


def test_selection_statistics_over_seeds(seeded_workdir):
    c, workdir = seeded_workdir
    rows = report.collect(workdir, trials.expand(c))
    configs = report.configurations(rows)["alexnet"]
    assert [x.name for x in configs] == ["sgd_lr0.01_wd1e-4_basic_do0.5",
                                         "adam_lr0.01_wd1e-4_basic_do0.5"]
    assert configs[0].mean_val == pytest.approx(0.60)
    assert report.pooled_std([0.61, 0.59, 0.60], [0.58, 0.60, 0.59]) == pytest.approx(0.01)
    text = report.margin_text(configs[0], configs[1], configs[0].values("best_val_accuracy"))
    assert "by 1.00 pp" in text and "pooled std) 1.00 pp: within the noise" in text


def test_summary_states_epochs_spread_and_margin(seeded_workdir, monkeypatch):
    c, workdir = seeded_workdir
    out = report.write_report(workdir, c)
    summary = open(os.path.join(workdir, "summary.md")).read()
    assert "trained for **3 epochs**" in summary and "not comparable" in summary
    assert "| alexnet | sgd | 0.01 | 0.0001 | basic | 0.5 | 3 | 60.00% ± 1.00 | 59.00% ± 1.00 |" \
        in summary
    assert "within the noise" in summary
    assert "| optimizer | adam | 59.00% ± 1.00 | 3 |" in summary  # effects with spread
    assert len(out["selected"]["alexnet"]) == 3
    # The runner-up was marked selected by the fixture: unmarked, its test figures removed.
    adam = [t for t in trials.expand(c) if dict(t.values)["optimizer"] == "adam"][0]
    result = workdir_lib.read_result(os.path.join(workdir, adam.relpath))
    assert result["selected"] is False and "test_accuracy" not in result


def test_val_curve_figure_names_every_trial_in_percent(seeded_workdir):
    c, workdir = seeded_workdir
    rows = report.collect(workdir, trials.expand(c))
    fig = plots.val_curves_figure(workdir, rows, "alexnet", "sgd_lr0.01_wd1e-4_basic_do0.5")
    axes = fig.axes
    assert [a.get_title().split(":")[0] for a in axes] == ["alexnet, adam", "alexnet, sgd"]
    for ax in axes:
        assert ax.get_ylabel() == "validation accuracy (%)" and ax.get_xlabel() == "epoch"
        assert ax.xaxis.get_major_locator()._integer  # integer epoch ticks
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(labels) == 3 and all("lr0.01_wd1e-4_basic_do0.5" in x for x in labels)
        for line in ax.get_lines():
            assert max(line.get_ydata()) > 1  # percent, not fractions
    sgd_labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert sum(x.startswith("best: ") for x in sgd_labels) == 3  # every seed of the best


def test_baseline_figure_says_when_the_baseline_is_missing(tmp_path, caplog):
    caplog.set_level("INFO")
    c = _grid()
    for t in trials.expand(c):
        _fake_trial(str(tmp_path), t, [0.3, 0.4, 0.5])
    rows = report.collect(str(tmp_path), trials.expand(c))
    fig = plots.baseline_figure(str(tmp_path), rows, "alexnet", rows[0], "sgd_lr0.1_wd5e-4_basic")
    (ax,) = fig.axes
    notices = [t.get_text() for t in ax.texts]
    assert notices == ["The untuned baseline sgd_lr0.1_wd5e-4_basic is not in this grid: only "
                       "the best trial is drawn."]
    assert "is not in this grid" in caplog.text
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"best: {rows[0]['name']}"]
    fig = plots.baseline_figure(str(tmp_path), rows, "alexnet", rows[1],
                                "sgd_lr0.01_wd1e-4_basic")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"best: {rows[1]['name']}", f"untuned baseline: {rows[0]['name']}"]
    assert not fig.axes[0].texts
    assert fig.axes[0].get_ylabel() == "validation accuracy (%)"


def test_report_reads_only_what_it_needs(tmp_path):
    """A trial directory with damaged result.json is reported as unreadable, not a crash."""
    c = _grid(optimizer="sgd")
    (t,) = trials.expand(c)
    os.makedirs(tmp_path / t.relpath)
    (tmp_path / t.relpath / "result.json").write_text("{oops")
    out = report.write_report(str(tmp_path), c)
    (row,) = out["rows"]
    assert row["status"] == "unreadable" and "not valid JSON" in row["error"]
    assert (tmp_path / t.relpath / "result.json").read_text() == "{oops"  # left as it was


def _publishable(c, workdir):
    report.write_report(workdir, c)
    workdir_lib.write_json_atomic(os.path.join(workdir, "grid_config.json"), c.to_dict())


def test_publish_names_a_part_of_the_study_and_keeps_its_evaluations():
    """A grid with the whole share of some models is 'part of the study', beside the published
    figures; fewer trials or epochs are a slice. The summary's evaluation links are copied."""
    from cifar_jax import publish

    part = {"models": ["alexnet"], "trials": 32, "per_model": collections.Counter(alexnet=32),
            "epochs": 10, "batch": 128, "source": "folder:cifar10-jpeg.tar.gz"}
    assert publish.is_study_part(part) and not publish.is_study(part)
    assert "**Part of the study**" in publish.definition(part, "1x GPU", 0)
    for changed in ({"per_model": collections.Counter(alexnet=16)}, {"epochs": 2},
                    {"source": "synthetic"}, {"finished": set()}):
        assert "**Not the study**" in publish.definition(dict(part, **changed), "1x GPU", 0)
    summary = ("[a](trials/alexnet/x/evaluation/test/summary.md), "
               "[b](trials/../../etc/evaluation/test/summary.md)")
    assert publish.linked_evaluations(summary) == ["trials/alexnet/x/evaluation/test"]


def test_publish_writes_results_and_a_readme_entry(seeded_workdir, tmp_path):
    from cifar_jax import publish

    c, workdir = seeded_workdir
    _publishable(c, workdir)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n")
    run_log = tmp_path / "run_log.json"
    run_log.write_text('{"commands": ["python -m cifar_jax.main ..."], "wall_times": {"study": '
                       '123.4}, "versions": {"jax": "0.0"}, "device": "1x cpu", '
                       '"machine": "Some CPU, 2 cores"}')
    out = tmp_path / "results" / "r"
    publish.publish(str(out), workdir, torch_grid=workdir, run_log=str(run_log),
                    readme=str(readme), command="python3 -m cifar_jax.publish ...")
    assert {"results.csv", "summary.md", "REPRODUCE.md", "run_log.json", "plots"} <= set(
        os.listdir(out))
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n") and text.endswith("tail\n")
    assert "### A slice of the study" in text and "The whole study has not run" in text
    assert ("6 grid trials of alexnet, 3 epochs each at batch 128, on CIFAR-10 from data source "
            "`tfds`, on a CPU (Some CPU, 2 cores)") in text and "**Not the study**" in text
    row = ("| alexnet | sgd_lr0.01_wd1e-4_basic_do0.5 | 60.00% ± 1.00 (n=3) | 59.00% ± 1.00 "
           "(n=3) | 60.00% ± 1.00 (n=3) | 59.00% ± 1.00 (n=3) | +0.00 pp, within the seeds' "
           "spread (1.00 pp pooled std) |")
    assert row in text and row in (out / "summary.md").read_text()
    assert "[`REPRODUCE.md`](results/r/REPRODUCE.md)" in text
    reproduce = (out / "REPRODUCE.md").read_text()
    assert "- study: 123 s" in reproduce and "Machine: Some CPU, 2 cores" in reproduce
    assert "python3 -m cifar_jax.publish ..." in reproduce
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 12  # JAX and twin rows


def test_publications_keep_one_readme_entry_each(seeded_workdir, tmp_path):
    """Two results folders coexist; republishing one replaces its own entry only; the study's
    entry comes first; REPRODUCE.md is linked only where it was written; a README without the
    markers gets the section once, one with a single marker is refused in one line."""
    from cifar_jax import cli, publish

    c, workdir = seeded_workdir
    _publishable(c, workdir)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    publish.publish(str(tmp_path / "results" / "a"), workdir, title="Slice A",
                    readme=str(readme))
    publish.publish(str(tmp_path / "results" / "b"), workdir, title="Slice B",
                    readme=str(readme))
    publish.publish(str(tmp_path / "results" / "a"), workdir, title="Slice A, again",
                    readme=str(readme))
    text = readme.read_text()
    assert text.count(publish.START) == text.count(publish.END) == 1
    assert "### Slice A, again" in text and "### Slice A\n" not in text
    assert text.index("### Slice A, again") < text.index("### Slice B")
    assert "REPRODUCE.md" not in text  # no --run_log: not written, not linked
    study = ("<!-- results:entry study results/z -->\n### The study\n\nfigures\n"
             "<!-- results:entry-end -->\n")
    text = publish.with_entry(text, study, "README.md")
    assert text.index("### The study") < text.index("### Slice A, again")
    assert "has not been run with this engine" not in text
    readme.write_text("# x\n<!-- results:start -->\n")
    with pytest.raises(cli.UsageError, match="only the start marker of the Results section"):
        publish.publish(str(tmp_path / "results" / "c"), workdir, readme=str(readme))
    assert not (tmp_path / "results" / "c").exists()  # refused before writing anything


def _trial(c, optimizer, seed=0):
    return next(t for t in trials.expand(c)
                if dict(t.values)["optimizer"] == optimizer and dict(t.values)["seed"] == seed)


def test_selection_waits_for_the_whole_grid_of_a_model(tmp_path):
    c = _grid()
    _fake_trial(str(tmp_path), _trial(c, "sgd"), [0.5, 0.6, 0.7])  # adam still pending
    out = report.write_report(str(tmp_path), c)
    assert out["selected"] == {}  # nothing selected or tested while provisional
    summary = open(tmp_path / "summary.md").read()
    assert "alexnet: provisional leader sgd_lr0.01_wd1e-4_basic_do0.5 (70.00% mean best val)" \
        in summary and "1 trials still to finish" in summary
    assert "test_accuracy" not in workdir_lib.read_result(str(tmp_path / _trial(c, "sgd").relpath))
    with pytest.raises(workdir_lib.WorkdirError, match="selects no configuration yet"):
        trials.selected_in(str(tmp_path))
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.publish", "--out",
                           str(tmp_path / "pub"), "--jax_grid", str(tmp_path)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "selects no configuration yet" in proc.stderr
    assert not (tmp_path / "pub").exists()  # refused before writing anything


def test_a_failed_seed_rules_its_configuration_out_and_ties_go_to_the_best_epochs_loss(tmp_path):
    c = _grid(seeds="0,1")
    for seed in (0, 1):
        _fake_trial(str(tmp_path), _trial(c, "sgd", seed), [0.5, 0.6, 0.6])
    _fake_trial(str(tmp_path), _trial(c, "adam", 0), [0.5, 0.9, 0.9])
    diverged = str(tmp_path / _trial(c, "adam", 1).relpath)
    os.makedirs(diverged)
    workdir_lib.write_result(diverged, {"status": "diverged", "framework": "jax",
                                        **_trial(c, "adam", 1).hyperparameters()})
    ranked = report.configurations(report.collect(str(tmp_path), trials.expand(c)))["alexnet"]
    assert [x.name for x in ranked] == ["sgd_lr0.01_wd1e-4_basic_do0.5"]  # not adam's 1 survivor
    # A tie in best val accuracy: the lower val loss *at the best epoch* wins (epoch 2 here;
    # the final epoch's loss says the opposite).
    c = _grid()
    for optimizer, best_epoch_loss, final_loss in (("sgd", 0.5, 0.1), ("adam", 0.4, 0.9)):
        t = _trial(c, optimizer)
        directory = str(tmp_path / "tie" / t.relpath)
        os.makedirs(directory)
        for epoch, (acc, loss) in enumerate([(0.5, 1.0), (0.7, best_epoch_loss),
                                             (0.6, final_loss)], 1):
            workdir_lib.append_jsonl(os.path.join(directory, "metrics.jsonl"),
                                     {"epoch": epoch, "step": epoch, "val_accuracy": acc,
                                      "val_loss": loss})
        workdir_lib.write_result(directory, {
            "status": "completed", "framework": "jax", **t.hyperparameters(),
            "best_val_accuracy": 0.7, "best_epoch": 2, "final_val_loss": final_loss,
            "test_accuracy": 0.5})  # as if evaluate_test had been on: not reported
    rows = report.collect(str(tmp_path / "tie"), trials.expand(c))
    assert [x.name for x in report.configurations(rows)["alexnet"]][0].startswith("adam")
    assert all(r["test_accuracy"] is None for r in rows)  # unselected: no test figures


def test_a_trial_that_another_process_reruns_is_running_not_failed(tmp_path):
    import json
    import socket

    c = _grid()
    _fake_trial(str(tmp_path), _trial(c, "sgd"), [0.5, 0.6, 0.7])
    adam = _trial(c, "adam")
    directory = tmp_path / adam.relpath
    directory.mkdir(parents=True)
    workdir_lib.write_result(str(directory), {"status": "failed", "framework": "jax",
                                              **adam.hyperparameters()})  # an earlier attempt
    (directory / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                    "pid": os.getppid()}))  # a live process
    assert trials.trial_status(str(tmp_path), adam) == "running"
    assert report.write_report(str(tmp_path), c)["selected"] == {}  # the model is still open
    os.remove(directory / "run.lock")  # released without a new result: the failure stands
    assert trials.trial_status(str(tmp_path), adam) == "failed"
