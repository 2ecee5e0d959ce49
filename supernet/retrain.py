"""Retraining a searched architecture from scratch: the stand-alone network on train+val, scored on test."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data, devices, runs
from .eval_network import EvalNetwork, count_parameters
from .search_config import SearchConfig
from .search_loop import DivergenceError, accuracy, seed_everything


def train_from_scratch(genotype: Any, config: SearchConfig, split: data.Split, seed: int, quiet: bool = True,
                       desc: str = "retrain", device: "str | torch.device" = "cpu", save_to: "Path | None" = None) -> dict:
    """Trains the stand-alone network of `genotype` on train+val for `retrain_epochs`; returns its test accuracy.

    `save_to`: a file that keeps the trained network (what `supernet export` reads).
    The network and batches live on `device`; the forward runs under the config's precision (autocast).
    """
    from tqdm.auto import tqdm

    c = config
    seed_everything(seed)
    model = EvalNetwork(c.space, genotype, C=c.retrain_C, layers=c.retrain_layers, num_classes=split.num_classes,
                        in_channels=split.in_channels)
    device = devices.resolve_device(device)
    precision = devices.Precision(c.precision, device)
    model = model.to(device)
    train = split.train_val
    steps = data.steps_per_epoch(len(train[0]), c.retrain_batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=c.retrain_lr, momentum=c.retrain_momentum,
                          weight_decay=c.retrain_weight_decay, nesterov=c.retrain_nesterov)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.retrain_epochs * steps)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=c.retrain_epochs * steps, desc=desc, unit="step", disable=quiet, leave=False, dynamic_ncols=True)
    loss_value = float("nan")
    for epoch in range(c.retrain_epochs):
        for x, y in data.epoch_batches(train, c.retrain_batch_size, seed, epoch,
                                       augment=split.black if c.augment else None):
            x, y = devices.to_device((x, y), device)
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = F.cross_entropy(model(x), y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise DivergenceError(f"retraining {desc}: loss became {loss_value} in epoch {epoch + 1}; "
                                      "try a smaller retrain_lr")
            precision.scale(loss).backward()
            if precision.scaler is not None:
                precision.scaler.unscale_(opt)
            norm = nn.utils.clip_grad_norm_(model.parameters(), c.retrain_grad_clip, foreach=True)
            if not math.isfinite(float(norm)) and precision.scaler is None:
                raise DivergenceError(f"retraining {desc}: the gradient became {float(norm)} in epoch {epoch + 1}; "
                                      "try a smaller retrain_lr")
            if precision.scaler is None:
                opt.step()
            else:
                precision.scaler.step(opt)
                precision.scaler.update()
            scheduler.step()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            bar.update()
    bar.close()
    if save_to is not None:
        save_retrained(save_to, model, tuple(split.test[0].shape[2:]))
    return {"genotype": model.space.format(model.genotype),
            "test_accuracy": accuracy(model, split.test, device=device, autocast=precision.autocast),
            "final_train_loss": loss_value,
            "parameters": count_parameters(model), "seconds": time.perf_counter() - start}


RETRAINED = "retrained_{}.pt"  # run-folder file of a retrained network: derived, random
MODEL_FORMAT = 1


def save_retrained(path: "str | Path", model: EvalNetwork, image_size: tuple[int, int]) -> Path:
    """Writes a retrained evaluation network (on the CPU) with what it takes to rebuild it."""
    config = {"format": MODEL_FORMAT, "space": model.space.name, "genotype": model.space.format(model.genotype),
              "C": model.C, "layers": model.layers, "num_classes": model.num_classes, "in_channels": model.in_channels,
              "auxiliary": model.auxiliary, "stem": model.stem_kind, "image_size": list(image_size)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return runs.save_checkpoint(path, {"config": config, "state": state})


def load_retrained(run_dir: "str | Path", name: str = "derived") -> tuple[EvalNetwork, tuple[int, int]]:
    """The retrained network `name` of a run folder, in eval mode, and its input image size."""
    path = Path(run_dir) / RETRAINED.format(name)
    if not path.is_file():
        raise ValueError(f"run folder {str(run_dir)!r} holds no retrained {name} network ({path.name}); "
                         "it was searched with retrain_epochs=0 or has not finished")
    state = runs.load_checkpoint(path)
    c = state["config"]
    model = EvalNetwork(c["space"], c["genotype"], C=c["C"], layers=c["layers"], num_classes=c["num_classes"],
                        in_channels=c["in_channels"], auxiliary=c["auxiliary"], stem=c["stem"])
    model.load_state_dict(state["state"])
    return model.eval(), tuple(c["image_size"])
