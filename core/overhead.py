"""What decodekit itself costs: hook dispatch per model call, and attach + detach time.

Used by ``decodekit bench --overhead``. Strategies are replaced by a no-op
strategy that implements every runtime hook of the loop, so the figures are
the framework's cost, not any strategy's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from . import hookspecs
from .errors import DecodekitError
from .hookspecs import hookimpl
from .session import attach
from .strategy import Strategy

_LOOP_HOOKS = {
    "continuous-denoising": (
        "decodekit_denoiser_forward",
        "decodekit_denoiser_output",
        "decodekit_step_end",
    ),
    "token-autoregression": ("decodekit_model_inputs", "decodekit_logits_processors"),
}


def noop_strategy(loop: str) -> Strategy:
    """A strategy that implements every per-call hook of ``loop`` and does nothing."""
    body: dict[str, Any] = {"name": "noop", "loops": (loop,)}
    for hook in _LOOP_HOOKS.get(loop, ()):
        spec = getattr(hookspecs.RuntimeSpecs, hook)
        args = spec.__code__.co_varnames[1 : spec.__code__.co_argcount]
        ns: dict[str, Any] = {}
        exec(f"def {hook}(self, {', '.join(args)}):\n    return None", ns)  # noqa: S102 - a signature-exact no-op
        body[hook] = hookimpl(ns[hook])
    return type("NoOp", (Strategy,), body)()


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_overhead(target: Any, repeat: int = 200) -> dict[str, Any]:
    """Dispatch cost per model call and attach+detach time on ``target`` (a pipeline or model).

    ``dispatch_s_per_call`` times the code the adapter runs around one model
    call (step counting, every runtime hook of the loop dispatched to a no-op
    strategy, NFE counting) with the model call itself replaced by a function
    that returns a ready output, over many calls; ``dispatch_fraction`` divides
    it by the median time of the real model call. Timing the hooked and plain
    model calls against each other would bury a microsecond cost in the noise
    of a millisecond call.
    """
    from .manager import get_manager
    from .session import find_adapter

    adapter_cls = find_adapter(target, get_manager())
    loop = adapter_cls.loop
    noop = noop_strategy(loop)
    module, call = _model_call(target, loop)

    attach_times = []
    for _ in range(max(5, repeat // 10)):
        t0 = time.perf_counter()
        run = attach(target, [noop])
        run.detach()
        attach_times.append(time.perf_counter() - t0)

    with torch.inference_mode():
        output = call()  # warm-up; its output is what the stand-in forward returns
        step = _median_time(call, repeat)
        run = attach(target, [noop])
        try:
            dispatch = _dispatch_once(run, module, output)
            n = 2000
            per_call = statistics.median(_median_time(dispatch, 1) for _ in range(n))
        finally:
            run.detach()
    return {
        "adapter": adapter_cls.name,
        "model": type(module).__name__,
        "repeat": repeat,
        "model_step_s": step,
        "dispatch_s_per_call": per_call,
        "dispatch_fraction": per_call / step if step > 0 else float("nan"),
        "attach_detach_s": statistics.median(attach_times),
    }


def _dispatch_once(run, module: torch.nn.Module, output: Any):
    """The adapter's per-call path with the model call replaced by returning ``output``."""
    adapter = run._adapter  # the adapter's own per-call path, not the strategies' view
    if run.loop == "continuous-denoising":
        args, kwargs = (), {}
        return lambda: adapter.denoise(module, lambda *a, **k: output, args, kwargs)
    kwargs: dict[str, Any] = {"input_ids": None}
    return lambda: adapter._pre_forward(module, (), kwargs)


def _model_call(target: Any, loop: str):
    """One representative model call for ``loop``: a UNet denoiser call, or a one-token LM forward."""
    if loop == "continuous-denoising":
        unet = getattr(target, "unet", None)
        if not isinstance(unet, torch.nn.Module):
            raise DecodekitError(
                f"--overhead times one representative UNet call; {type(target).__name__} has "
                "no UNet (a diffusion transformer's call takes family-specific inputs). Bench "
                "without --overhead, or measure the overhead on a UNet pipeline."
            )
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        dtype = unet.dtype
        sample = torch.randn(2, cfg.in_channels, size, size, dtype=dtype, device=unet.device)
        ctx_dim = (
            cfg.cross_attention_dim
            if isinstance(cfg.cross_attention_dim, int)
            else cfg.cross_attention_dim[0]
        )
        text = torch.randn(2, 8, ctx_dim, dtype=dtype, device=unet.device)
        t = torch.tensor(500, device=unet.device)
        extra = {}
        if cfg.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(
                    2,
                    cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                    dtype=dtype,
                    device=unet.device,
                ),
                "time_ids": torch.zeros(2, 6, dtype=dtype, device=unet.device),
            }
        return unet, lambda: unet(sample, t, encoder_hidden_states=text, **extra)
    from transformers import Pipeline

    model = target.model if isinstance(target, Pipeline) else target
    if loop != "token-autoregression" or not isinstance(model, torch.nn.Module):
        raise DecodekitError(
            f"--overhead measures UNet pipelines and transformers language models; "
            f"{type(target).__name__} (loop {loop}) is not one. Bench without --overhead."
        )
    ids = torch.ones(1, 16, dtype=torch.long, device=model.device)
    return model, lambda: model(input_ids=ids)
