"""Publishes finished grids into the repository: results/<name>/ and an entry in the README's
Results section.

  python -m cifar_jax.publish --out results/2026-12-01-h200 --jax_grid runs/grid \
      [--torch_grid runs/grid_torch] [--recipe runs/recipe] [--bench bench.json] \
      [--run_log run_log.json] [--title "The study on one H200"] [--readme README.md]

Writes into --out: results.csv (every trial of the JAX grid, its repeat seeds and the twin's
trials, a framework column apart), summary.md (what was run, in words; each selected
configuration's test accuracy over its seeds, JAX beside the PyTorch twin, and whether the two
differ by more than the seeds' spread; then the JAX grid's own report), plots/, bench.md
(--bench), REPRODUCE.md and run_log.json (--run_log: commands, versions, machine, wall times),
and the recipe's table and files (--recipe).

With --readme it writes this publication's entry in the README's Results section (between
`<!-- results:start -->` and `<!-- results:end -->`): one entry per results folder, the study's
first; publishing a folder again replaces its own entry only. The numbers in the README are
never typed by hand.
"""

import collections
import csv
import io
import math
import os
import re
import shlex
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import flags, logging

from cifar_jax import cli, datasets, report, trials as trials_lib, workdir as workdir_lib

START, END = "<!-- results:start -->", "<!-- results:end -->"
ENTRY = re.compile(r"<!-- results:entry (study|other) (.+?) -->\n.*?<!-- results:entry-end -->\n",
                   re.S)
# The study's published best configuration per model, where this project records it.
PUBLISHED_BEST_CONFIG = {"resnet18": "adam_lr0.001_wd1e-4_basic"}
STUDY_EPOCHS, STUDY_TRIALS, STUDY_BATCH = 10, 64, 128
NO_STUDY_YET = (
    "The whole study has not run with this engine on a GPU yet (parts of it may have, below). "
    "`scripts/gpu_sitting.sh` runs a GPU sitting as one device call (preflight, bench, the "
    "models' grids that fit, profile), continuing an earlier sitting's grid from the records "
    "committed beside its results, and `python -m cifar_jax.publish` adds its entry here, first.")


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


def agreement(jax_test: Sequence[float], torch_test: Sequence[float]) -> str:
    """Whether JAX and the twin differ by more than the spread of their seeds."""
    if not jax_test or not torch_test:
        return "–"
    diff = 100 * (sum(jax_test) / len(jax_test) - sum(torch_test) / len(torch_test))
    spread = report.pooled_std(list(jax_test), list(torch_test))
    if spread is None:
        return f"{diff:+.2f} pp (one seed each: spread unknown)"
    verdict = "more than" if abs(diff) > 100 * spread else "within"
    return f"{diff:+.2f} pp, {verdict} the seeds' spread ({100 * spread:.2f} pp pooled std)"


def frameworks_table(jax_sel, torch_sel) -> str:
    lines = ["| model | selected configuration | JAX: best val | JAX: test | PyTorch twin: best "
             "val | PyTorch twin: test | JAX - twin (test) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for model, e in jax_sel.items():
        t = torch_sel.get(model, {"val": [], "test": []})
        lines.append(f"| {model} | {e['name']} | {_pct(e['val'])} | {_pct(e['test'])} | "
                     f"{_pct(t['val'])} | {_pct(t['test'])} | "
                     f"{agreement(e['test'], t['test'])} |")
    return "\n".join(lines)


def data_note(source: str, dataset: str = "cifar10") -> str:
    title = datasets.get(dataset).title
    if "jpeg" in source.lower():
        return (f"the JPEG quality-75 re-encoding of {title} (which runs slightly below the "
                "original files)")
    return f"{title} from data source `{source}`"


# ----------------------------------------------------------------------------------------------
# What was run, in words.


def shape(grid_config: Dict[str, Any]) -> Dict[str, Any]:
    """The grid's shape as a publication states it (from its grid_config.json)."""
    import ml_collections

    grid = trials_lib.expand(ml_collections.ConfigDict(grid_config))
    return {"models": list(dict.fromkeys(t.model for t in grid)), "trials": len(grid),
            "per_model": collections.Counter(t.model for t in grid),
            "epochs": grid_config["num_epochs"], "batch": grid_config["batch_size"],
            "source": grid_config["data"]["source"],
            "dataset": grid_config["data"].get("dataset", "cifar10")}


def device_text(run_log: Optional[Dict[str, Any]]) -> str:
    log = run_log or {}
    device, machine = log.get("device"), log.get("machine")
    if device and "cpu" in device.lower() and machine:
        return f"a CPU ({machine})"
    return device or "a device not recorded (no --run_log)"


def is_study(s: Dict[str, Any]) -> bool:
    return (s["epochs"] == STUDY_EPOCHS and s["trials"] >= STUDY_TRIALS
            and s.get("dataset", "cifar10") == "cifar10"
            and set(s["models"]) >= set(report.PUBLISHED_BEST_VAL))


def is_study_part(s: Dict[str, Any]) -> bool:
    """Every model of the grid ran its whole share of the study (configs/grid.py) on real
    images and has its selection reported: its accuracies compare with the study's published
    figures, though other models are missing."""
    from configs import grid

    study = collections.Counter(t.model for t in trials_lib.expand(grid.get_config()))
    finished = s.get("finished", set(s["models"]))  # models whose selection is reported
    return (s["epochs"] == STUDY_EPOCHS and s["batch"] == STUDY_BATCH and bool(s["models"])
            and s["source"] != "synthetic" and s.get("dataset", "cifar10") == "cifar10"
            and set(s["models"]) <= set(finished)
            and all(s["per_model"][m] >= study.get(m, math.inf) for m in s["models"]))


def definition(s: Dict[str, Any], device: str, torch_seeds: int) -> str:
    models = ", ".join(s["models"])
    data = data_note(s["source"], s.get("dataset", "cifar10"))
    text = (f"{s['trials']} grid trials of {models}, {s['epochs']} epochs each at batch "
            f"{s['batch']}, on {data}, on {device}; each model's "
            "configuration selected on the validation split and tested once")
    if torch_seeds:
        text += f"; the PyTorch twin trained the selected configurations ({torch_seeds} runs)"
    text += "."
    if not is_study(s) and is_study_part(s):
        text += (f" **Part of the study** (which is {STUDY_TRIALS} trials of "
                 f"{', '.join(report.PUBLISHED_BEST_VAL)}): the whole share of "
                 f"{', '.join(s['models'])}, so its accuracies compare with the study's "
                 "published figures.")
    elif not is_study(s):
        text += (f" **Not the study**, which is {STUDY_TRIALS} trials of "
                 f"{', '.join(report.PUBLISHED_BEST_VAL)} for {STUDY_EPOCHS} epochs on a GPU: "
                 "its accuracies are not comparable with the study's published figures.")
    return text


# ----------------------------------------------------------------------------------------------
# Files.


def summary_markdown(title: str, text: str, jax_sel, torch_sel, grid_summary: str) -> str:
    return "\n".join([
        f"# {title}", "", text, "",
        "Test accuracy of each model's selected configuration: mean ± standard deviation over "
        "its seeds (n). The last column compares the two frameworks' means with the pooled "
        "standard deviation of their seeds.", "",
        frameworks_table(jax_sel, torch_sel), "",
        "## The JAX grid's report", "",
        re.sub(r"(?m)^(#+) ", r"##\1 ", grid_summary)]) + "\n"  # its headings below ours


def reproduce_markdown(run_log: Dict[str, Any], publish_command: str) -> str:
    lines = ["# How these results were produced", "",
             f"Device: {run_log.get('device', 'not recorded')}",
             f"Machine: {run_log.get('machine', 'not recorded')}", "", "Versions:", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(run_log.get("versions", {}).items())]
    lines += ["", "Commands, in order (each resumes where it stopped when run again):", "",
              "```bash", *[c for c in run_log.get("commands", [])  # earlier publishing: ours
                           if "cifar_jax.publish" not in c], publish_command, "```", "",
              "Wall times (each phase's total over its runs):", ""]
    walls = run_log.get("wall_times", {})
    lines += [f"- {k}: {v:.0f} s ({v / 60:.1f} min)" for k, v in walls.items()]
    if walls:
        total = sum(walls.values())
        lines.append(f"- all: {total:.0f} s ({total / 60:.1f} min)")
    return "\n".join(lines) + "\n"


def linked_evaluations(summary: str) -> List[str]:
    """The trials' evaluation folders that a summary links (trials/.../evaluation/test)."""
    found = re.findall(r"\((trials/[^)\s]+/evaluation/[a-z]+)/summary\.md\)", summary)
    return sorted({f for f in found if ".." not in f.split("/")})


def combined_csv(jax_grid: str, torch_grid: Optional[str]) -> str:
    """The JAX grid's results.csv with the twin's rows appended (one header)."""
    out = io.StringIO()
    writer = None
    for grid in filter(None, (jax_grid, torch_grid)):
        with open(os.path.join(grid, "results.csv")) as f:
            reader = csv.DictReader(f)
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
                writer.writeheader()
            writer.writerows(reader)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# The README's Results section.


def entry_markdown(out_rel: str, title: str, text: str, jax_sel, torch_sel, recipe_sel,
                   bench_table: Optional[str], study: bool, reproduce: bool,
                   beside_published: bool = False) -> str:
    """The README entry; `beside_published`: the study's table (the published figures beside
    ours) for a part of the study too."""
    links = f"files in [`{out_rel}`]({out_rel})"
    if reproduce:
        links += f", commands, versions and wall times in [`REPRODUCE.md`]({out_rel}/REPRODUCE.md)"
    lines = [f"<!-- results:entry {'study' if study else 'other'} {out_rel} -->", f"### {title}",
             "", f"{text} Mean ± std over seeds (n); {links}.", ""]
    if study or beside_published:
        lines += ["| model | published best val (config) | ours, JAX: selected config | val | "
                  "test | ours, PyTorch twin: val | test | selection agrees with the study |",
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
    else:
        lines.append(frameworks_table(jax_sel, torch_sel))
    if recipe_sel:
        lines += ["", "Beyond the study (configs/recipe.py):", "",
                  "| model | study recipe: test | this recipe: test |", "| --- | ---: | ---: |"]
        for model, e in recipe_sel.items():
            lines.append(f"| {model} | {_pct(jax_sel.get(model, {'test': []})['test'])} | "
                         f"{_pct(e['test'])} |")
    if bench_table:
        lines += ["", "Speed:", "", bench_table]
    return "\n".join(lines + ["<!-- results:entry-end -->", ""])


def with_entry(readme: str, entry: str, readme_path: str) -> str:
    """`readme` with `entry` in its Results section: replacing the entry of the same results
    folder, keeping the others, the study's first. Without the markers, the section is added
    at the end; with only one of them, the README is refused."""
    if (START in readme) != (END in readme):
        raise cli.UsageError(f"{readme_path} has {'only the start' if START in readme else 'only the end'} "
                             f"marker of the Results section; it needs both, {START} and {END} "
                             "(or neither: the section is then added at the end).")
    if START not in readme:
        logging.info("%s has no Results section: adding it at the end.", readme_path)
        readme = readme.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = readme.split(START, 1)
    body, tail = rest.split(END, 1)
    new = ENTRY.match(entry)
    entries = {(m.group(1), m.group(2)): m.group(0) for m in ENTRY.finditer(body)
               if m.group(2) != new.group(2)}
    entries[(new.group(1), new.group(2))] = entry
    ordered = [entries[k] for k in sorted(entries, key=lambda k: (k[0] != "study", k[1]))]
    intro = "" if any(kind == "study" for kind, _ in entries) else NO_STUDY_YET + "\n\n"
    section = f"{START}\n## Results\n\n{intro}" + "\n".join(ordered) + END
    return head + section + tail


# ----------------------------------------------------------------------------------------------


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


def publish(out: str, jax_grid: str, torch_grid: Optional[str] = None,
            recipe: Optional[str] = None, bench: Optional[str] = None,
            run_log: Optional[str] = None, title: Optional[str] = None,
            readme: Optional[str] = None, command: str = "", note: str = "") -> None:
    """Everything the module docstring says; every input is checked before anything is
    written."""
    bench_data = _read_input(bench, dict, "bench")
    log = _read_input(run_log, dict, "run_log")
    if bench_data is not None and not isinstance(bench_data.get("table"), str):
        raise cli.UsageError(f"--bench={bench!r} has no 'table': write it with "
                             "`python -m cifar_jax.bench --out`.")
    readme_text = None
    if readme:
        if not os.path.isfile(readme):
            raise cli.UsageError(f"--readme={readme!r} is not a file.")
        with open(readme) as f:
            readme_text = f.read()
        with_entry(readme_text, "<!-- results:entry other x -->\n<!-- results:entry-end -->\n",
                   readme)  # refuses a README with one marker now, before writing anything
    jax_rows = read_rows(jax_grid)
    torch_rows = read_rows(torch_grid) if torch_grid else []
    jax_sel, torch_sel = selected(jax_rows), selected(torch_rows)
    recipe_sel = selected(read_rows(recipe)) if recipe else {}
    if not jax_sel:
        raise cli.UsageError(f"--jax_grid={jax_grid!r} selects no configuration yet: a "
                             "model is selected once all of its grid trials have finished.")
    pending = sum(r["status"] in trials_lib.UNFINISHED for r in jax_rows)
    if pending:
        logging.warning("%s: %d trials have not finished; publishing the models that have.",
                        jax_grid, pending)
    grid_config = workdir_lib.read_json_object(os.path.join(jax_grid, "grid_config.json"))
    if grid_config is None:
        raise cli.UsageError(f"{jax_grid}/grid_config.json not found: --jax_grid must be the "
                             "workdir of a grid run.")
    s = dict(shape(grid_config), finished=set(jax_sel))
    study = is_study(s)
    title = title or ("The study" if study else "Part of the study" if is_study_part(s)
                      else "A slice of the study")
    text = definition(s, device_text(log), len(torch_rows)) + (f" {note}" if note else "")

    needed = [os.path.join(jax_grid, "summary.md")] + (
        [os.path.join(recipe, n) for n in ("results.csv", "summary.md")] if recipe else [])
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise cli.UsageError(f"{', '.join(missing)} not found: run the grid's report there "
                             "first (python -m cifar_jax.report --workdir GRID).")
    with open(needed[0]) as f:
        summary = summary_markdown(title, text, jax_sel, torch_sel, f.read())
    csv_text = combined_csv(jax_grid, torch_grid)

    os.makedirs(out, exist_ok=True)
    write = lambda name, content: workdir_lib.write_text_atomic(  # noqa: E731
        os.path.join(out, name), content)
    write("results.csv", csv_text)
    write("summary.md", summary)
    if os.path.isdir(os.path.join(jax_grid, "plots")):
        shutil.copytree(os.path.join(jax_grid, "plots"), os.path.join(out, "plots"),
                        dirs_exist_ok=True)
    for evaluation in linked_evaluations(summary):  # the grid's summary links them
        if os.path.isdir(os.path.join(jax_grid, evaluation)):
            shutil.copytree(os.path.join(jax_grid, evaluation), os.path.join(out, evaluation),
                            dirs_exist_ok=True)
    if recipe:
        for name in ("results.csv", "summary.md"):
            shutil.copy(os.path.join(recipe, name), os.path.join(out, "recipe_" + name))
    bench_table = bench_data["table"] if bench_data else None
    if bench_table:
        write("bench.md", bench_table + "\n")
    if log is not None:
        write("REPRODUCE.md", reproduce_markdown(log, command))
        shutil.copy(run_log, os.path.join(out, "run_log.json"))
    if readme:
        out_rel = os.path.relpath(out, os.path.dirname(os.path.abspath(readme)))
        entry = entry_markdown(out_rel, title, text, jax_sel, torch_sel, recipe_sel,
                               bench_table, study, reproduce=log is not None,
                               beside_published=is_study_part(s))
        workdir_lib.write_text_atomic(readme, with_entry(readme_text, entry, readme))
    print(f"Published to {out}" + (f" and {readme}" if readme else ""))


def _define_flags() -> None:
    """Flags only when run as a program (bench, imported beside it in tests, has --out too)."""
    flags.DEFINE_string("out", None, "The results directory to write, e.g. "
                        "results/2026-12-01-h200.")
    flags.DEFINE_string("jax_grid", None, "Workdir of the study's grid run with JAX.")
    flags.DEFINE_string("torch_grid", None, "Workdir of the same grid (or its selected "
                        "configurations) run with the PyTorch twin.")
    flags.DEFINE_string("recipe", None, "Workdir of configs/recipe.py (beyond the study).")
    flags.DEFINE_string("bench", None, "JSON written by `python -m cifar_jax.bench --out`.")
    flags.DEFINE_string("run_log", None, "JSON with 'commands' (list), 'wall_times' (name -> "
                        "s), 'versions', 'device' and 'machine', as scripts/run_log.sh writes it.")
    flags.DEFINE_string("title", None, "The heading of this publication's README entry "
                        "(default: 'The study' for the full grid, 'Part of the study' for whole "
                        "per-model shares of it, else 'A slice of the study').")
    flags.DEFINE_string("readme", None, "README.md whose Results section gets this entry.")
    flags.DEFINE_string("note", "", "A sentence added to what was run (e.g. how the wall times "
                        "were measured), in summary.md and the README entry.")
    flags.mark_flags_as_required(["out", "jax_grid"])


def main(argv):
    del argv
    f = flags.FLAGS
    publish(f.out, f.jax_grid, f.torch_grid, f.recipe, f.bench, f.run_log, f.title, f.readme,
            command=shlex.join(["python3", "-m", "cifar_jax.publish", *sys.argv[1:]]),
            note=f.note)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
