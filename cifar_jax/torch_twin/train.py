"""The study's training recipe in PyTorch, reading the same config and data as the JAX run.

It shares the run-directory rules with the JAX side (`cifar_jax.workdir`): the lock, the
stored-config comparison with its `allow_config_change` path, metrics.jsonl and the
result.json fields. A checkpoint (model, optimizer, schedule, epoch, RNG) is saved at every
epoch end and resumed from; checkpoints are loaded with `weights_only=True`.
"""

import errno
import math
import os
import pickle
import signal
import time
from typing import Any, Dict, Optional

import torch
from absl import logging

from cifar_jax import config_checks, datasets, input_pipeline, models
from cifar_jax import workdir as workdir_lib
from cifar_jax.torch_twin import augment
from cifar_jax.torch_twin.models import get_model

PRECISION = {"default": None, "tf32": "high", "highest": "highest"}


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up, then cosine from 1 to 0 over the remaining steps (per step). Written
    apart from optim.unit_schedule on purpose: the parity test compares the two."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0), decay) / decay
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.SGD(momentum) / Adam(weight_decay) / AdamW, as the study used them."""
    if config.decay_bn_and_bias:
        groups = [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    else:
        # Kernels only, as cifar_jax.optim: the weights of convolutions and linear layers.
        kernels = {id(m.weight) for m in model.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        decay = [p for p in model.parameters() if id(p) in kernels]
        no_decay = [p for p in model.parameters() if id(p) not in kernels]
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; valid: sgd, adam, adamw.")


def make_scheduler(config, optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps))


def set_precision(precision: str) -> None:
    """config.precision on the PyTorch side: the same TF32/float32 choice as JAX. 'default'
    leaves each framework's own default, and those differ on NVIDIA GPUs: XLA uses TF32 for
    convolutions and matmuls, PyTorch for convolutions only. Compare with 'tf32' or 'highest'."""
    if PRECISION[precision] is not None:
        torch.set_float32_matmul_precision(PRECISION[precision])
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


def distillation_loss(logits, teacher_logits, labels, temperature: float, alpha: float,
                      label_smoothing: float = 0.0):
    """Mean (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), as the usual PyTorch
    distillation code writes it (cifar_jax.engine.distillation_loss; the twin itself trains
    without a teacher: distillation runs in JAX)."""
    f = torch.nn.functional
    hard = f.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    soft = f.kl_div(f.log_softmax(logits / temperature, 1), f.softmax(teacher_logits / temperature,
                    1), reduction="batchmean")
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def build_model(config) -> torch.nn.Module:
    return get_model(config.model, num_classes=datasets.of_config(config).num_classes,
                     dropout_rate=models.dropout_rate(config.model, config.dropout_rate))


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model, split: input_pipeline.Split, batch_size: int, device,
             tta_flip: bool = False, info=datasets.CIFAR10) -> Dict[str, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        x = augment.augment(split.images[start:start + batch_size], "none", None,
                            info).to(device)
        y = torch.as_tensor(split.labels[start:start + batch_size], dtype=torch.long).to(device)
        logits = model(x).float()
        if tta_flip:
            logits = 0.5 * (logits + model(x.flip(3)).float())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"loss": loss_sum / len(split), "accuracy": correct / len(split)}


def evaluate_checkpoint(config, workdir: str, split: input_pipeline.Split) -> Dict[str, float]:
    """Loss and accuracy of a twin run's best-validation model on `split`."""
    device = _device()
    model = build_model(config).to(device)
    model.load_state_dict(_load(
        os.path.join(workdir, "torch_best.pt"), device, "Move it and torch_checkpoint.pt away "
        "and run again (the twin then trains this run afresh), or use a new --workdir."))
    return evaluate(model, split, config.eval_batch_size, device, config.tta_flip,
                    datasets.of_config(config))


def _load(path: str, device, remedy: str = "Move it away and run again: the twin then starts "
          "this run afresh.") -> Dict[str, Any]:
    """A twin checkpoint (tensors and plain data only); CheckpointError naming a damaged one."""
    from cifar_jax.checkpointing import CheckpointError, error_summary

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        # OSError EINVAL: a truncated archive (torch's zip reader seeks past its end); other
        # OS errors (permission, disk) are not damage and stay as they are.
        if isinstance(e, OSError) and e.errno not in (errno.EINVAL, None):
            raise
        raise CheckpointError(f"{path} is unreadable ({error_summary(e)}). {remedy}") from e


def train_and_evaluate(config, workdir: str,
                       dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    """Trains `config` in `workdir` with the twin, holding the directory's lock."""
    from cifar_jax.stopping import Diverged

    if config.framework != "torch":  # `python -m cifar_jax.torch_twin` with a JAX config
        config = config.copy_and_resolve_references()
        config.framework = "torch"
    config_checks.validate_config(config, num_devices=1)
    workdir = os.path.abspath(workdir)
    workdir_lib.ensure_writable(workdir)
    with workdir_lib.RunLock(workdir).acquire():
        result = train_locked(config, workdir, dataset)
    if result["status"] == "diverged":
        raise Diverged(result["error"])
    return result


def train_locked(config, workdir: str,
                 dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    """`train_and_evaluate` for a caller that holds the workdir's lock (the grid)."""
    workdir = os.path.abspath(workdir)
    previous = workdir_lib.finished_run(config, workdir)  # the same rules as the JAX side
    if previous is not None:
        return previous
    data = dataset if dataset is not None else input_pipeline.load_dataset(config.data)
    config_checks.check_run_shape(config, data)
    workdir_lib.store_config(config, workdir)  # every check has passed
    return _Run(config, workdir, data).train()


class _Run:
    def __init__(self, config, workdir: str, data: input_pipeline.Dataset):
        self.config, self.workdir, self.data = config, workdir, data
        self.device = _device()
        set_precision(config.precision)
        self.steps_per_epoch = len(data.train) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = make_scheduler(config, self.optimizer, self.total_steps,
                                        self.warmup_steps)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.checkpoint_path = os.path.join(workdir, "torch_checkpoint.pt")
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.epoch, self.best_val, self.best_epoch, self.train_time = 0, -1.0, 0, 0.0
        self._restore()
        workdir_lib.truncate_jsonl(self.metrics_path, self.epoch * self.steps_per_epoch)

    def _restore(self):
        if not os.path.exists(self.checkpoint_path):
            return
        ckpt = _load(self.checkpoint_path, self.device)
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer_name") == self.config.optimizer:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:  # only under allow_config_change: the stored-config check refuses it otherwise
            logging.warning("The optimizer changed from %s to %s: its state starts afresh.",
                            ckpt.get("optimizer_name"), self.config.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._use_config_hyperparameters()
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        if self.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.epoch, self.best_val = ckpt["epoch"], ckpt["best_val"]
        self.best_epoch, self.train_time = ckpt["best_epoch"], ckpt["train_time"]
        logging.info("Resumed the PyTorch twin from epoch %d.", self.epoch)

    def _use_config_hyperparameters(self):
        """The config is the source of truth for learning rate, weight decay and momentum,
        also on resume (they differ from the checkpoint's only under allow_config_change)."""
        fresh = make_optimizer(self.config, self.model)
        lr = self.config.learning_rate
        multiplier = lr_multiplier(self.scheduler.last_epoch, self.total_steps,
                                   self.warmup_steps)
        for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
            for key in ("weight_decay", "momentum", "nesterov"):
                if key in new:
                    group[key] = new[key]
            group["initial_lr"], group["lr"] = lr, lr * multiplier
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)

    def _train_epoch(self, stop=lambda: False) -> Optional[Dict[str, Any]]:
        """One epoch; None when `stop()` turned true first (the epoch is then redone on
        resume, from the previous epoch's checkpoint)."""
        config, model = self.config, self.model
        model.train()
        perm = torch.randperm(len(self.data.train), generator=self.generator).numpy()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        for i in range(self.steps_per_epoch):
            if stop():
                return None
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            x = augment.augment(self.data.train.images[idx], config.data.augmentation,
                                self.generator, self.data.info).to(self.device,
                                                                   non_blocking=True)
            y = torch.as_tensor(self.data.train.labels[idx], dtype=torch.long).to(self.device)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y,
                                                     label_smoothing=float(config.label_smoothing))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.train_time += seconds
        self.epoch += 1
        return {"epoch": self.epoch, "step": self.epoch * self.steps_per_epoch,
                "train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen,
                # The rate of the epoch's last step (the scheduler already holds the next).
                "learning_rate": config.learning_rate * lr_multiplier(
                    self.epoch * self.steps_per_epoch - 1, self.total_steps, self.warmup_steps),
                "epoch_time_s": seconds,
                "images_per_sec": seen / seconds}

    def _save(self):
        tmp = self.checkpoint_path + ".tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "generator": self.generator.get_state(), "epoch": self.epoch,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": (torch.cuda.get_rng_state_all() if self.device.type == "cuda"
                                 else []),
                    "optimizer_name": self.config.optimizer,
                    "best_val": self.best_val, "best_epoch": self.best_epoch,
                    "train_time": self.train_time}, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _save_best(self):
        path = os.path.join(self.workdir, "torch_best.pt")
        torch.save(self.model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def _end_epoch(self, record: Dict[str, Any]) -> None:
        """Validation, the best weights, metrics.jsonl, the checkpoint, one log line."""
        config = self.config
        if self.data.val is not None:
            v = evaluate(self.model, self.data.val, config.eval_batch_size, self.device,
                         config.tta_flip, self.data.info)
            record.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        metric = workdir_lib.selection_accuracy(record)
        if metric > self.best_val:
            self.best_val, self.best_epoch = metric, self.epoch
            self._save_best()  # before the checkpoint that names it: a retrain redoes both
        workdir_lib.append_jsonl(self.metrics_path, record)
        self._save()
        logging.info("[torch] epoch %d/%d  train loss %.4f acc %.2f%%  val acc %s  %.0f img/s",
                     self.epoch, config.num_epochs, record["train_loss"],
                     100 * record["train_accuracy"],
                     f"{100 * record['val_accuracy']:.2f}%" if "val_accuracy" in record
                     else "-", record["images_per_sec"])

    def _result(self, status: str, record: Dict[str, Any], **fields) -> Dict[str, Any]:
        device = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        result = workdir_lib.result_record(
            self.config, status, "torch",
            num_params=sum(p.numel() for p in self.model.parameters()),
            total_steps=self.total_steps,
            best_val_accuracy=self.best_val if self.best_epoch else None,
            best_epoch=self.best_epoch or None, final_val_accuracy=record.get("val_accuracy"),
            final_val_loss=record.get("val_loss"), train_time_s=self.train_time,
            devices=f"1x {device}", **fields)
        workdir_lib.write_result(self.workdir, result)
        return result

    def train(self) -> Dict[str, Any]:
        from cifar_jax.stopping import Preempted, SignalFlag

        config, record = self.config, {}
        with SignalFlag("stopping after the current batch; the rerun redoes this epoch from "
                        "the last epoch-end checkpoint") as signals:
            while self.epoch < config.num_epochs:
                record = self._train_epoch(stop=lambda: signals.received is not None)
                if record is None:
                    self._result("preempted", {}, step=self.epoch * self.steps_per_epoch)
                    raise Preempted(
                        f"Stopped by {signal.Signals(signals.received).name} in epoch "
                        f"{self.epoch + 1}; the twin saves at epoch ends, so the rerun resumes "
                        f"from the end of epoch {self.epoch} in {self.workdir}.")
                if not math.isfinite(record["train_loss"]):
                    return self._result("diverged", record, step=(self.epoch - 1) *
                                        self.steps_per_epoch, error=self._divergence())
                self._end_epoch(record)
            signals.finishing = True
            result = self._complete(record)
        signals.stop_if_received()
        return result

    def _divergence(self) -> str:
        error = (f"Non-finite loss in epoch {self.epoch} (the twin checks once per epoch). The "
                 f"last good checkpoint is epoch {self.epoch - 1}'s, in {self.checkpoint_path}.")
        logging.error("[torch] %s", error)
        return error

    def _complete(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Test evaluation of the weights the run keeps (its best epoch's, torch_best.pt), as
        on the JAX side, and the completed result."""
        config = self.config
        if not record:
            records = workdir_lib.read_jsonl(self.metrics_path)
            record = records[-1] if records else {}
        test = {"loss": None, "accuracy": None}
        if config.evaluate_test:
            test = evaluate_checkpoint(config, self.workdir, self.data.test)
        result = self._result(
            "completed", record, step=self.total_steps, classes=list(self.data.classes),
            test_accuracy=test["accuracy"],
            test_loss=test["loss"], images_per_sec=(self.total_steps * config.batch_size /
                                                    self.train_time if self.train_time else None))
        logging.info("[torch] finished: best val accuracy %.2f%%, test accuracy %s",
                     100 * self.best_val, "not evaluated" if test["accuracy"] is None
                     else f"{100 * test['accuracy']:.2f}%")
        return result
