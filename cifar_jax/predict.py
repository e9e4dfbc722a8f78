"""Classifies image files with a trained model.

  python -m cifar_jax.predict --workdir runs/default photo.jpg more_photos/
  python -m cifar_jax.predict --workdir runs/grid --model alexnet --top_k 3 --out preds.csv dir/

Each image is decoded as the data pipeline decodes (8-bit RGB; the same refusals by name),
resized to 32x32 when it is not (said in its line), normalised as in training and classified
with the run's best weights, in batches. One line per image: the path and the top K classes
with their probabilities. --out writes CSV or JSON (by suffix). --tta flip averages the
mirror image's logits, as evaluation does (default: as the run evaluated). A file that is not
an image is named and skipped (exit status 1 at the end); hidden files and folders
(.DS_Store, __MACOSX) are passed over.
"""

import csv
import io
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags, logging

from cifar_jax import cli

PROGRESS_EVERY = 2000  # images; folders larger than this get progress lines


def image_paths(paths: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to classify (folders walked, sorted; hidden entries passed over) and
    (path, reason) for arguments that name nothing."""
    from cifar_jax.input_pipeline import is_junk

    files, missing = [], []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not is_junk(d))
                files += [os.path.join(root, n) for n in sorted(names) if not is_junk(n)]
        else:
            missing.append((path, "no such file or folder"))
    return files, missing


def decoded(files: Sequence[str]) -> Iterator[Tuple[str, Optional[np.ndarray], str]]:
    """(path, 32x32 uint8 RGB or None, note): the note says what was resized or why a file
    was skipped."""
    from cifar_jax.input_pipeline import DataError, decode_image

    for path in files:
        try:
            with open(path, "rb") as f:
                image = decode_image(f.read(), path)
        except (DataError, OSError) as e:
            yield path, None, str(e)
            continue
        note = ""
        if image.shape[:2] != (32, 32):
            note = f"resized from {image.shape[1]}x{image.shape[0]}"
            image = resize(image)
        yield path, image, note


def resize(image: np.ndarray) -> np.ndarray:
    """To 32x32 with an antialiased bicubic filter (the training images are 32x32)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC))


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> List[Tuple[str, float]]:
    order = np.argsort(-probs)[:k]
    return [(classes[i], float(probs[i])) for i in order]


def write_out(path: str, rows: List[Dict], skipped: List[Tuple[str, str]], about: Dict) -> None:
    from cifar_jax import workdir

    if path.lower().endswith(".json"):
        rows = [dict(r, top=[{"class": c, "probability": p} for c, p in r["top"]])
                for r in rows]
        text = json.dumps({**about, "predictions": rows,
                           "skipped": [{"path": p, "reason": r} for p, r in skipped]}, indent=2)
    else:
        out = io.StringIO()
        k = max((len(r["top"]) for r in rows), default=0)
        w = csv.writer(out)
        w.writerow(["path", *[f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "prob")],
                    "note", "tta_flip", "model"])
        for r in rows:
            w.writerow([r["path"], *[v for c, p in r["top"] for v in (c, f"{p:.6f}")],
                        r["note"], about["tta_flip"], about["model"]])
        text = out.getvalue()
    workdir.write_text_atomic(path, text)


def predict(trained, paths: Sequence[str], k: int = 3, tta: Optional[bool] = None,
            batch_size: int = 256) -> Tuple[List[Dict], List[Tuple[str, str]]]:
    """Classifies the images under `paths`, printing one line each; returns the rows (path,
    top-k (class, probability), note) and the (path, reason) of what was skipped."""
    from cifar_jax import evaluation, inference

    files, skipped = image_paths(paths)
    predictor = inference.Predictor(trained, batch_size, tta)
    logging.info("Classifying %d files with %s (flip TTA %s).", len(files), trained.description,
                 "on" if predictor.tta_flip else "off")
    rows: List[Dict] = []
    batch: List[Tuple[str, np.ndarray, str]] = []

    def flush():
        if batch:
            probs = evaluation.softmax(predictor(np.stack([b[1] for b in batch])))
            for (path, _, note), p in zip(batch, probs):
                rows.append({"path": path, "top": top_k(p, trained.classes, k), "note": note})
                print(f"{path}: " + ", ".join(f"{c} {q:.3f}" for c, q in rows[-1]["top"])
                      + (f"  ({note})" if note else ""))
            batch.clear()

    for n, (path, image, note) in enumerate(decoded(files), 1):
        if image is None:
            logging.error("Skipping %s: %s", path, note)
            skipped.append((path, note))
        else:
            batch.append((path, image, note))
            if len(batch) == batch_size:
                flush()
        if len(files) > PROGRESS_EVERY and n % PROGRESS_EVERY == 0:
            logging.info("predict: %d/%d files", n, len(files))
    flush()
    return rows, skipped


def main(argv):
    from cifar_jax import inference

    f = flags.FLAGS
    if len(argv) < 2:
        raise cli.UsageError("Give image files or folders to classify, e.g. "
                             "`python -m cifar_jax.predict --workdir runs/x photo.jpg`.")
    if f.out and not f.out.lower().endswith((".csv", ".json")):
        raise cli.UsageError(f"--out={f.out!r}: the suffix chooses the format, .csv or .json.")
    if f.out:  # before the work, not after it
        from cifar_jax import workdir

        directory = os.path.dirname(os.path.abspath(f.out))
        if not os.path.isdir(directory):
            raise cli.UsageError(f"--out={f.out!r}: the directory {directory} does not exist.")
        workdir.ensure_writable(directory, what=f"write {f.out}")
    cli.check_workdir_flag(f.workdir)
    trained = inference.load(f.workdir, f.model, f.seed)
    tta = None if f.tta == "run" else f.tta == "flip"
    rows, skipped = predict(trained, argv[1:], f.top_k, tta, f.batch_size)
    if f.out:
        write_out(f.out, rows, skipped, {
            "model": trained.description, "workdir": trained.workdir,
            "dataset": trained.info.name, "tta_flip": trained.tta_flip if tta is None else tta})
    if skipped:
        print(f"error: {len(skipped)} skipped (not images, or not found): "
              + ", ".join(p for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
              file=sys.stderr)
        raise SystemExit(1)


def _define_flags() -> None:
    """Flags only when run as a program (main's --workdir would clash in one process)."""
    cli.define_trained_model_flags("use")
    flags.DEFINE_integer("top_k", 3, "Classes listed per image.", lower_bound=1)
    flags.DEFINE_string("out", None, "Also write the predictions to this .csv or .json file.")
    flags.DEFINE_enum("tta", "run", ["run", "flip", "none"], "Test-time augmentation: as the "
                      "run evaluated (run), the mean with the mirror image (flip), or none.")
    flags.DEFINE_integer("batch_size", 256, "Images per forward pass.", lower_bound=1)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, positional=True)
