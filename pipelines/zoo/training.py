"""The pieces every zoo trainer shares: the optimiser, one optimiser step, and the training record
(with the records of the runs a model continued from)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch


def adamw_warmup_cosine(
    params: Any, *, lr: float, weight_decay: float, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (betas 0.9, 0.98) and a schedule: linear warm-up over ``warmup`` steps, then a cosine
    down to 0 at ``steps``."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, rate)


def optimiser_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    bar: Any,
    clip_params: Any = None,
) -> None:
    """Backward, optional grad-norm clip to 1.0, step the optimiser and the LR schedule, show the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()
    schedule.step()
    bar.set_postfix(loss=f"{loss.item():.4f}")


def write_training_record(out: Path, started: float, **info: Any) -> None:
    """Write ``training.json``: the run's settings, its wall-clock seconds and torch threads."""
    record = {
        **info,
        "train_seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def link_folder(link: Path, target: Path) -> None:
    """Make `link` a relative link to the folder `target` (one copy of shared weights).

    A link or file already at `link` is replaced; a real folder there is refused.
    """
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        raise FileExistsError(f"{link} is a folder; remove it to link {target} instead.")
    rel = os.path.relpath(target.resolve(), link.parent.resolve())
    link.symlink_to(rel, target_is_directory=True)


def earlier_runs(init_from: Path | None) -> list[dict[str, Any]]:
    """The training records of the runs `init_from` came from, oldest first (none without it)."""
    record_file = None if init_from is None else Path(init_from) / "training.json"
    if record_file is None or not record_file.is_file():
        return []
    record = json.loads(record_file.read_text())
    return [*record.pop("earlier_runs", []), record]
