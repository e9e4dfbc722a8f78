"""The study's training recipe in PyTorch, reading the same config and data as the JAX run.

Writes the same `metrics.jsonl` / `result.json` as cifar_jax.train so that reports can put
both frameworks side by side. A checkpoint (model, optimizer, schedule, epoch, RNG) is saved at
every epoch end and resumed from.
"""

import math
import os
import time
from typing import Any, Dict, Optional

import torch
from absl import logging

from cifar_jax import config_checks, input_pipeline, metric_writing, models
from cifar_jax.torch_twin import augment
from cifar_jax.torch_twin.models import get_model


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up, then cosine from 1 to 0 over the remaining steps (per step)."""
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
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
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


def dropout_rate_for(config) -> float:
    return models.dropout_rate(config.model, config.dropout_rate)


def build_model(config) -> torch.nn.Module:
    kwargs = ({"dropout_rate": dropout_rate_for(config)}
              if config.model in models.MODELS_WITH_DROPOUT else {})
    return get_model(config.model, **kwargs)


@torch.no_grad()
def evaluate(model, split: input_pipeline.Split, batch_size: int, device) -> Dict[str, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        x = augment.augment(split.images[start:start + batch_size], "none", None).to(device)
        y = torch.as_tensor(split.labels[start:start + batch_size], dtype=torch.long).to(device)
        logits = model(x).float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"loss": loss_sum / len(split), "accuracy": correct / len(split)}


def evaluate_checkpoint(config, workdir: str, split: input_pipeline.Split) -> Dict[str, float]:
    """Loss and accuracy of a twin run's best-validation model on `split`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config).to(device)
    model.load_state_dict(torch.load(os.path.join(workdir, "torch_best.pt"), map_location=device))
    return evaluate(model, split, config.eval_batch_size, device)


def train_and_evaluate(config, workdir: str,
                       dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    config_checks.validate_config(config, num_devices=1)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    result_path = os.path.join(workdir, "result.json")
    previous = metric_writing.read_json(result_path)
    if previous and previous.get("status") == "completed":
        logging.info("Run in %s already finished: %s", workdir, previous)
        return previous
    metric_writing.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = dataset if dataset is not None else input_pipeline.load_dataset(config.data)
    steps_per_epoch = len(data.train) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, total_steps, warmup_steps)
    generator = torch.Generator().manual_seed(config.seed)
    num_params = sum(p.numel() for p in model.parameters())
    ckpt_path = os.path.join(workdir, "torch_checkpoint.pt")
    start_epoch, best_val, best_epoch, train_time = 0, -1.0, -1, 0.0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        start_epoch, best_val, best_epoch, train_time = (
            ckpt["epoch"], ckpt["best_val"], ckpt["best_epoch"], ckpt["train_time"])
        logging.info("Resumed the PyTorch twin from epoch %d.", start_epoch)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    label_smoothing = float(config.label_smoothing)
    record: Dict[str, Any] = {}
    for epoch in range(start_epoch, config.num_epochs):
        model.train()
        perm = torch.randperm(len(data.train), generator=generator).numpy()
        t0 = time.perf_counter()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for i in range(steps_per_epoch):
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            x = augment.augment(data.train.images[idx], config.data.augmentation, generator)
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(data.train.labels[idx], dtype=torch.long).to(device)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                  "train_loss": float(loss_sum) / seen, "train_accuracy": float(correct) / seen,
                  "learning_rate": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_time,
                  "images_per_sec": seen / epoch_time}
        if data.val is not None:
            v = evaluate(model, data.val, config.eval_batch_size, device)
            record.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        metric = record.get("val_accuracy", record["train_accuracy"])
        if metric > best_val:
            best_val, best_epoch = metric, epoch
            torch.save(model.state_dict(), os.path.join(workdir, "torch_best.pt"))
        metric_writing.append_jsonl(metrics_path, record)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "epoch": epoch + 1, "best_val": best_val, "best_epoch": best_epoch,
                    "train_time": train_time}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        logging.info("[torch] epoch %d/%d  train loss %.4f acc %.2f%%  val acc %s  %.0f img/s",
                     epoch + 1, config.num_epochs, record["train_loss"],
                     100 * record["train_accuracy"],
                     f"{100 * record['val_accuracy']:.2f}%" if "val_accuracy" in record else "-",
                     record["images_per_sec"])

    test = {"loss": None, "accuracy": None}
    if config.get("evaluate_test", True):
        test = evaluate(model, data.test, config.eval_batch_size, device)
    result = {"status": "completed", "framework": "torch", "model": config.model,
              "optimizer": config.optimizer, "learning_rate": config.learning_rate,
              "weight_decay": config.weight_decay, "augmentation": config.data.augmentation,
              "dropout_rate": dropout_rate_for(config), "seed": config.seed,
              "num_params": num_params, "step": total_steps, "total_steps": total_steps,
              "best_val_accuracy": best_val, "best_epoch": best_epoch + 1,
              "final_val_accuracy": record.get("val_accuracy"),
              "final_val_loss": record.get("val_loss"), "test_accuracy": test["accuracy"],
              "test_loss": test["loss"], "train_time_s": train_time,
              "images_per_sec": total_steps * config.batch_size / train_time if train_time else None,
              "devices": f"1x {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"}
    metric_writing.write_json_atomic(result_path, result)
    logging.info("[torch] finished: best val accuracy %.2f%%, test accuracy %s", 100 * best_val,
                 "not evaluated" if test["accuracy"] is None else f"{100 * test['accuracy']:.2f}%")
    return result
