"""Retraining a searched architecture from scratch: the stand-alone network on train+val, scored on test."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data, devices
from .eval_network import EvalNetwork, count_parameters
from .search_config import SearchConfig
from .search_loop import DivergenceError, accuracy, seed_everything


def train_from_scratch(genotype: Any, config: SearchConfig, split: data.Split, seed: int, quiet: bool = True,
                       desc: str = "retrain", device: "str | torch.device" = "cpu") -> dict:
    """Trains the stand-alone network of `genotype` on train+val for `retrain_epochs`; returns its test accuracy.

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
        for x, y in data.epoch_batches(train, c.retrain_batch_size, seed, epoch):
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
    return {"genotype": model.space.format(model.genotype),
            "test_accuracy": accuracy(model, split.test, device=device, autocast=precision.autocast), "final_train_loss": loss_value,
            "parameters": count_parameters(model), "seconds": time.perf_counter() - start}
