"""A strategy's second model beside the pipeline's (a draft, a refiner): check that it fits.

Used by `code` (VAR refiner) and `cspd` (MAR draft): a second model given from
Python must already sit on the pipeline model's device and dtype, must pass the
pipeline's own ``check_model``, and a folder it comes from must hold the
pipeline's autoencoder (the tokens it learnt are that autoencoder's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["check_second_model", "same_weights"]


def check_second_model(model: Any, reference: Any, pipe: Any, role: str, path: str) -> None:
    """Refuse ``model`` unless it is on ``reference``'s device and dtype and ``pipe.check_model`` accepts it.

    ``role`` names it in the message ("the refiner", "the draft"); errors are
    `ConfigError` at ``path``.
    """
    want, got = next(reference.parameters()), next(model.parameters())
    if (got.device, got.dtype) != (want.device, want.dtype):
        name = role.split()[-1]
        raise ConfigError(
            path,
            f"{role} is on {got.device} in {got.dtype}, the pipeline's model on "
            f"{want.device} in {want.dtype}; move it first "
            f"({name}.to({str(want.device)!r}, {want.dtype}))",
        )
    try:
        pipe.check_model(model)
    except (TypeError, ValueError) as e:
        raise ConfigError(path, str(e)) from None


def same_weights(weights: Path, module: Any) -> bool:
    """Whether the safetensors file ``weights`` holds ``module``'s state (to float16 precision).

    True when there is no such file or no state to compare (nothing says they differ).
    """
    from safetensors.torch import load_file

    if not weights.is_file() or not hasattr(module, "state_dict"):
        return True
    theirs, ours = load_file(weights), module.state_dict()
    return theirs.keys() == ours.keys() and all(
        theirs[k].shape == ours[k].shape
        and torch.allclose(theirs[k].float(), ours[k].detach().float().cpu(), rtol=1e-3, atol=1e-3)
        for k in ours
    )
