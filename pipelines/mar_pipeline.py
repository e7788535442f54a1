"""Class-conditional MAR sampling: `MARPipeline` and its loop, `MARDecoder`.

The loop of MAR's ``sample_tokens`` (LTH14/mar, ``models/mar.py``), with every
random number drawn from one ``torch.Generator`` per row:

* each row draws its own random generation order (a permutation of the ``N``
  positions) and a noise table ``(N, S, D)``: the head noise of each position,
  so the token sampled at a position is a function of its condition;
* step ``s`` of ``num_iter`` runs the model once over the tokens known so far
  and samples the positions it reveals with the diffusion head. After step ``s``,
  ``floor(N * cos(pi/2 * (s + 1) / num_iter))`` positions stay unknown, clipped to
  ``[1, unknown - 1]`` (at least one revealed, one kept) except at the last step,
  which reveals the rest (`mask_schedule`); a row reveals the positions at the
  end of its order first (MAR's ``mask_by_order`` keeps the order's head masked);
* classifier-free guidance (``cfg != 1``) adds null-class rows; the head mixes
  the noise predictions with ``cfg`` (``"constant"``) or with MAR's linear ramp
  ``1 + (cfg - 1) * (N - mask_len) / N`` (``"linear"``), ``mask_len`` the clipped
  count still unknown after the step (`guidance_scale`);
* ``temperature`` scales the noise of every head step.

The tokens ``(B, N, D)`` are unpatchified into latents and decoded by the KL
autoencoder (``vae.decode(latents / vae.config.scaling_factor)``). A strategy
advances the loop itself through ``decodekit_mar_step(run, decoder)`` (see
`decodekit.hookspecs`); its adapter, ``mar``, is in ``decodekit.pipelines.mar_adapter``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.mar import HeadTrajectory, MARModel
from decodekit.sampler import check_generator
from decodekit.session import attached_run
from torch import Tensor

__all__ = [
    "CFG_SCHEDULES",
    "MARDecoder",
    "MAROutput",
    "MARPipeline",
    "guidance_scale",
    "mask_schedule",
]

PIPELINE_FILE = "mar.json"
"""The pipeline-level file of a mar folder (class names); the models are in ``model/`` and ``vae/``."""

CFG_SCHEDULES = ("linear", "constant")


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """MAR's ``mask_len`` of every step: unknown tokens after step ``s``, clipped, ``num_iter`` values.

    ``floor(seq_len * cos(pi/2 * (s + 1) / num_iter))`` clipped to
    ``[1, unknown_before - 1]``; the last step reveals every token left, though its
    ``mask_len`` (which the linear guidance ramp reads) stays the clipped value.
    """
    lengths, unknown = [], seq_len
    for step in range(num_iter):
        ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = max(1, min(unknown - 1, math.floor(seq_len * ratio)))
        lengths.append(mask_len)
        unknown = mask_len
    return lengths


def guidance_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """The head's guidance scale at a step whose clipped ``mask_len`` is given (MAR's ``cfg_iter``)."""
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}.")


@dataclass
class MAROutput:
    """What a `MARPipeline` call returns."""

    images: list[Any] | None
    """PIL images, one per row; None with ``output_type="latents"``."""
    tokens: Tensor
    """``(B, N, D)``: the sampled continuous tokens."""
    latents: Tensor
    """``(B, C, h, w)``: the tokens unpatchified, in the model's (scaled) latent space."""
    forwards: int = 0
    """Model forwards of the call (a guided forward is one)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """``stats["models"][name]``: each model's ``forwards`` and ``seconds``;
    ``"model"`` is the pipeline's, others ``"model-1"``, ``"model-2"`` … in order of first use."""


class MARDecoder:
    """One call's MAR loop: tokens, mask, orders and head noise of ``B`` rows.

    Attributes:
        pipe: the `MARPipeline`; ``model`` its `MARModel`.
        class_labels: ``(B,)`` long.
        num_iter: steps of the call; ``step`` the steps done.
        cfg, cfg_schedule: guidance (``cfg == 1`` runs no null-class rows).
        temperature: factor on the head's noise.
        generators: one per row.
        orders: ``(B, N)`` long; step ``s`` reveals ``orders[:, masked_after(s):masked_after(s - 1)]``.
        noise: ``(B, N, S, D)``: the head noise of every position.
        tokens: ``(B, N, D)``, zeros where unknown; ``mask`` ``(B, N)`` bool, True where unknown.
        mask_lengths: MAR's clipped ``mask_len`` per step (`mask_schedule`).
        forwards: model forwards so far; ``stats`` per model.
        run: the attached run, whose ``nfe`` counts the forwards too, or None.
    """

    def __init__(
        self,
        pipe: MARPipeline,
        class_labels: Tensor,
        *,
        num_iter: int,
        cfg: float,
        cfg_schedule: str,
        temperature: float,
        generators: list[torch.Generator],
        run: Any = None,
    ):
        self.pipe, self.model, self.run = pipe, pipe.model, run
        self.class_labels = class_labels
        self.num_iter, self.cfg, self.cfg_schedule = num_iter, float(cfg), cfg_schedule
        self.temperature = float(temperature)
        self.generators = generators
        config = self.model.config
        N, D, S = config.seq_len, config.token_embed_dim, self.model.diffloss.num_steps
        self.batch, self.seq_len = class_labels.shape[0], N
        device = class_labels.device
        dtype = next(self.model.parameters()).dtype
        orders, noise = [], []
        for g in generators:  # each row's draws come from its own generator only
            orders.append(torch.randperm(N, generator=g, device=g.device).to(device))
            noise.append(torch.randn((N, S, D), generator=g, device=g.device))
        self.orders = torch.stack(orders)  # (B, N)
        # drawn in float32 whatever the model's dtype: a seed gives the same noise in every dtype
        self.noise = torch.stack(noise).to(device=device, dtype=dtype)  # (B, N, S, D)
        self.tokens = torch.zeros(self.batch, N, D, device=device, dtype=dtype)
        self.mask = torch.ones(self.batch, N, dtype=torch.bool, device=device)
        self.mask_lengths = mask_schedule(N, num_iter)
        self.step = 0
        self.forwards = 0
        self.stats: dict[str, Any] = {"models": {}}
        self._names: dict[int, str] = {}

    # -- the schedule ---------------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        """Whether null-class rows run (``cfg != 1``, as MAR decides)."""
        return self.cfg != 1.0

    def masked_after(self, step: int) -> int:
        """Tokens still unknown after step ``step`` (0 after the last; ``N`` before the first)."""
        if step < 0:
            return self.seq_len
        return 0 if step >= self.num_iter - 1 else self.mask_lengths[step]

    def positions(self, step: int) -> Tensor:
        """``(B, k)`` the positions step ``step`` reveals, each row's in its order."""
        return self.orders[:, self.masked_after(step) : self.masked_after(step - 1)]

    def guidance(self, step: int) -> float:
        """The head's guidance scale at step ``step``."""
        return guidance_scale(self.cfg, self.cfg_schedule, self.mask_lengths[step], self.seq_len)

    # -- the work -------------------------------------------------------------------------------
    def model_name(self, model: Any) -> str:
        """``"model"`` for the pipeline's model, else ``"model-1"``, ``"model-2"`` … in order of first use."""
        if model is self.model:
            return "model"
        return self._names.setdefault(id(model), f"model-{len(self._names) + 1}")

    def conditions(
        self, model: MARModel, tokens: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One forward of ``model``: ``(z, z_uncond)``, each ``(B, N, Cd)`` (``z_uncond`` None unguided).

        ``tokens``/``mask`` default to the decoder's current ones.
        """
        self.pipe.check_model(model)
        tokens = self.tokens if tokens is None else tokens
        mask = self.mask if mask is None else mask
        labels = self.class_labels
        if self.guided:
            null = torch.full_like(labels, model.config.class_num)
            tokens, mask = torch.cat((tokens, tokens)), torch.cat((mask, mask))
            labels = torch.cat((labels, null))  # (2B,)
        start = time.perf_counter()
        z = model.conditions(tokens.to(self.tokens.dtype), mask, model.class_embedding(labels))
        if z.is_cuda:  # the seconds are the model's, not its kernel launches'
            torch.cuda.synchronize(z.device)
        per = self.stats["models"].setdefault(
            self.model_name(model), {"forwards": 0, "seconds": 0.0}
        )
        per["forwards"] += 1
        per["seconds"] += time.perf_counter() - start
        self.forwards += 1
        if self.run is not None:
            self.run.nfe += 1
        return (z[: self.batch], z[self.batch :]) if self.guided else (z, None)

    def gather_step(self, x: Tensor, step: int) -> Tensor:
        """Rows of ``x`` ``(B, N, ...)`` at ``positions(step)``, flattened row-major: ``(B * k, ...)``."""
        pos = self.positions(step)  # (B, k)
        B, k = pos.shape
        index = pos.reshape(B, k, *([1] * (x.dim() - 2))).expand(B, k, *x.shape[2:])
        return x.gather(1, index).reshape(B * k, *x.shape[2:])

    def sample(
        self,
        model: MARModel,
        z: Tensor,
        z_uncond: Tensor | None,
        step: int,
        *,
        trajectory: bool = False,
    ) -> Tensor | HeadTrajectory:
        """``model``'s head samples ``(B, k, D)`` at ``positions(step)`` from the noise table.

        With ``trajectory`` the whole `HeadTrajectory` of the ``B * k`` tokens (row-major).
        """
        B, k = self.positions(step).shape
        at = self.gather_step
        head = model.diffloss
        if head.num_steps != self.noise.shape[2]:
            raise ValueError(
                f"this model's head samples in {head.num_steps} steps, the noise table has "
                f"{self.noise.shape[2]}; models of one call must share num_sampling_steps."
            )
        out = head.sample(
            at(z, step),
            self.temperature,
            self.guidance(step),
            z_uncond=None if z_uncond is None else at(z_uncond, step),
            noise=at(self.noise, step),
            trajectory=trajectory,
        )
        return out if trajectory else out.reshape(B, k, -1)

    def commit(self, values: Tensor) -> None:
        """Write ``values`` ``(B, k, D)`` at ``positions(step)``, unmask them and advance ``step``."""
        if self.step >= self.num_iter:
            raise ValueError(f"all {self.num_iter} steps are done.")
        pos = self.positions(self.step)
        if values.shape != (*pos.shape, self.tokens.shape[-1]):
            raise ValueError(
                f"step {self.step} reveals {tuple(pos.shape)} positions: values must be "
                f"{(*pos.shape, self.tokens.shape[-1])}, got {tuple(values.shape)}."
            )
        index = pos[..., None].expand(-1, -1, self.tokens.shape[-1])
        self.tokens.scatter_(1, index, values.to(self.tokens.dtype))
        self.mask.scatter_(1, pos, False)
        self.step += 1

    def run_step(self, model: MARModel | None = None) -> Tensor:
        """One plain step with ``model`` (default: the pipeline's); returns the committed ``(B, k, D)``."""
        model = self.model if model is None else model
        step = self.step
        if self.positions(step).shape[1] == 0:  # nothing to reveal: no forward
            values = self.tokens.new_zeros(self.batch, 0, self.tokens.shape[-1])
        else:
            z, z_uncond = self.conditions(model)
            values = self.sample(model, z, z_uncond, step)
        self.commit(values)
        return values


class MARPipeline:
    """Class-conditional image generation with a `MARModel` and a KL autoencoder.

    A folder holds ``model/`` (``config.json``, ``model.safetensors``), ``vae/``
    (a diffusers ``AutoencoderKL``) and optionally ``mar.json`` with
    ``class_names`` (then a class may be named by its caption). ``decodekit
    convert-mar`` writes one from MAR's released checkpoints.
    """

    def __init__(self, model: MARModel, vae: Any, class_names: list[str] | None = None):
        self.model = model.eval()
        self.vae = vae.eval() if hasattr(vae, "eval") else vae
        self.class_names = list(class_names) if class_names is not None else None
        self.decoder: MARDecoder | None = None
        self.check_vae(vae)
        if self.class_names is not None and len(self.class_names) != model.config.class_num:
            raise ValueError(
                f"{len(self.class_names)} class names for {model.config.class_num} classes."
            )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, torch_dtype: torch.dtype | None = None
    ) -> MARPipeline:
        """Load a mar folder (``model/``, ``vae/``, optional ``mar.json``)."""
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if not (folder / "model").is_dir() or not (folder / "vae").is_dir():
            raise ValueError(
                f"{folder} is not a mar folder: it needs model/ and vae/ "
                "(`decodekit convert-mar` writes one from MAR's released checkpoints)."
            )
        model = MARModel.from_pretrained(folder / "model", torch_dtype=torch_dtype)
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        vae = AutoencoderKL.from_pretrained(folder / "vae", **dtype)
        names = None
        if (folder / PIPELINE_FILE).is_file():
            names = json.loads((folder / PIPELINE_FILE).read_text()).get("class_names")
        return cls(model, vae, names)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder `from_pretrained` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder / "model")
        self.vae.save_pretrained(folder / "vae")
        text = json.dumps({"class_names": self.class_names}, indent=1) + "\n"
        (folder / PIPELINE_FILE).write_text(text)

    def to(self, device: str | torch.device) -> MARPipeline:
        self.model.to(device)
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_vae(self, vae: Any) -> None:
        """Refuse an autoencoder whose latents are not the model's tokens' (channels, stride)."""
        config, vc = self.model.config, getattr(vae, "config", None)
        if vc is None:
            return
        stride = 2 ** (len(vc.block_out_channels) - 1)
        wrong = []
        if vc.latent_channels != config.vae_embed_dim:
            wrong.append(
                f"latent_channels {vc.latent_channels} (vae_embed_dim {config.vae_embed_dim})"
            )
        if stride != config.vae_stride:
            wrong.append(f"stride {stride} (vae_stride {config.vae_stride})")
        if wrong:
            raise ValueError(
                "the autoencoder does not fit the MAR model: " + ", ".join(wrong) + "."
            )

    def check_model(self, model: Any) -> None:
        """Refuse a model that does not share this pipeline's tokens and classes."""
        if not isinstance(model, MARModel):
            raise TypeError(f"a MAR step runs a MARModel, got {type(model).__name__}.")
        own, cfg = self.model.config, model.config
        keys = ("seq_len", "token_embed_dim", "class_num")
        wrong = [
            f"{k} {getattr(cfg, k)} (the pipeline has {getattr(own, k)})"
            for k in keys
            if getattr(cfg, k) != getattr(own, k)
        ]
        if wrong:
            raise ValueError("this MARModel does not fit the pipeline: " + ", ".join(wrong) + ".")

    def class_ids(self, classes: Any) -> Tensor:
        """Class ids ``(B,)`` from ints or (with ``class_names``) captions."""
        rows = [classes] if isinstance(classes, (int, str)) else list(classes)
        num = self.model.config.class_num
        if any(isinstance(c, str) for c in rows):
            names = self.class_names or []
            unknown = [c for c in rows if isinstance(c, str) and c not in names]
            if unknown:
                known = (
                    ", ".join(repr(n) for n in names[:8]) or "none: this model has no class_names"
                )
                raise ValueError(f"unknown class name {unknown[0]!r}; known: {known}.")
            rows = [names.index(c) if isinstance(c, str) else c for c in rows]
        rows = [int(c) if isinstance(c, Tensor) and c.dim() == 0 else c for c in rows]
        if not rows or any(
            not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num for c in rows
        ):
            raise ValueError(
                f"class labels must be a non-empty list of ints in [0, {num - 1}], got {classes!r}."
            )
        return torch.tensor(rows, dtype=torch.long)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Any,
        *,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> MAROutput:
        """Generate one image per class label.

        Args:
            class_labels: a class id or a list of them (or captions from ``class_names``).
            num_iter: MAR steps, 1 .. N (each reveals at least one token).
            cfg: guidance scale; 1 runs no null-class rows.
            cfg_schedule: ``"linear"`` (MAR's ramp, its default) or ``"constant"``.
            temperature: factor on the diffusion head's noise (>= 0).
            generator: one ``torch.Generator`` per row (a row's image then does not
                depend on its batch mates), or one shared by all rows.
            output_type: ``"pil"`` (images, tokens and latents) or ``"latents"``.
        """
        call_kwargs = dict(
            class_labels=class_labels,
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            generator=generator,
            output_type=output_type,
        )
        run = attached_run(self)
        if run is None:
            return self.generate(**call_kwargs)
        return run.guarded_call(call_kwargs, lambda: self.generate(run=run, **call_kwargs))

    def decoder_for(
        self,
        class_labels: Any,
        *,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        run: Any = None,
    ) -> MARDecoder:
        """The `MARDecoder` of a call (nothing run yet); ``run`` counts its forwards in ``run.nfe``."""
        labels = self.class_ids(class_labels).to(self.device)
        N = self.model.config.seq_len
        if not isinstance(num_iter, int) or isinstance(num_iter, bool) or not 1 <= num_iter <= N:
            raise ValueError(
                f"num_iter must be an int in [1, {N}] (each step reveals at least one of the "
                f"{N} tokens), got {num_iter!r}."
            )
        for name, value, low in (("cfg", cfg, None), ("temperature", temperature, 0.0)):
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if not ok or (low is not None and value < low):
                bound = f" >= {low:g}" if low is not None else ""
                raise ValueError(f"{name} must be a finite number{bound}, got {value!r}.")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}.")
        batch = labels.shape[0]
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
        if len(gens) != batch:
            raise ValueError(f"got {len(gens)} generators for {batch} rows; pass one per row.")
        for g in gens:
            check_generator(g, torch.empty(0, device=self.device), "MARPipeline")
        decoder = MARDecoder(
            self,
            labels,
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            generators=gens,
            run=run,
        )
        self.decoder = decoder
        return decoder

    @torch.no_grad()
    def generate(
        self, class_labels: Any, *, run: Any = None, output_type: str = "pil", **kwargs: Any
    ) -> MAROutput:
        """The loop: strategies may take steps over (``decodekit_mar_step``); the rest run plainly."""
        if output_type not in ("pil", "latents"):
            raise ValueError(f"output_type must be 'pil' or 'latents', got {output_type!r}.")
        decoder = self.decoder_for(class_labels, run=run, **kwargs)
        hooked = run is not None and run.has("decodekit_mar_step")
        while decoder.step < decoder.num_iter:
            before = decoder.step
            done = run.call("decodekit_mar_step", run=run, decoder=decoder) if hooked else None
            if done is None:
                decoder.run_step()
            elif not isinstance(done, int) or done < 1 or decoder.step != before + done:
                raise ValueError(
                    f"decodekit_mar_step returned {done!r} but the decoder went from step "
                    f"{before} to {decoder.step}; return the number of steps committed (>= 1)."
                )
        latents = self.model.unpatchify(decoder.tokens)
        images = self.decode_latents(latents) if output_type == "pil" else None
        return MAROutput(images, decoder.tokens, latents, decoder.forwards, decoder.stats)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> list[Any]:
        """PIL images from model-space latents ``(B, C, h, w)``."""
        from diffusers.image_processor import VaeImageProcessor

        vae = self.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(scaled).sample  # (B, 3, H, W) in [-1, 1]
        return VaeImageProcessor(do_resize=False).postprocess(pixels.float(), output_type="pil")
