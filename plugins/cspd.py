"""CSpD, from "Continuous Speculative Decoding for Autoregressive Image Generation" (arXiv:2411.11925).

A small MAR (the *draft*) makes ``gamma`` MAR steps; the pipeline's MAR (the
*target*) verifies the continuous tokens they revealed, each by a density ratio
``min(1, p(x) / q(x))``, and replaces a rejected one by a draw from the residual
``(p - q)+``. The first ``prefill_ratio`` of the steps are the target's alone.
The paper: 2.33x at about the same FID with MAR-B drafting for MAR-H, 256 MAR
steps, 4 draft steps per verification.

Two acceptance rules (the statistics are in `decodekit.continuous_speculative`):

``paper`` — the reference's rule (MarkXCloud/CSpD, spec_decode/spec_decode_runner.py,
``SpecDecodeRunner.run`` and ``DistributionProcessor``), approximations included:

* one target forward per window, over the tokens known before the window: the
  target's distribution of every drafted token ignores the other drafted tokens;
* each token accepted on its own (``speculative_sample``), nothing dropped;
* the "density" of a head sample is its last DDPM step's Gaussian (a step that
  adds no noise: the draft token sits at its own mean), times the ratio of the
  earlier steps' standard deviations (``fixed_term``), both flattened by a
  temperature of 42 (``x1_pdf_unormalize`` / ``x2_pdf_unormalize``);
* the residual drawn from the target's last-step Gaussian by rejection, at most
  100 tries, after which the token stays a zero vector (``sample_distribution``).

``exact`` — preserves the distribution of the plain target pipeline (same
steps, orders and guidance): the sample is the whole head trajectory (a product
of Gaussians, so the ratio is exact; the draft and target use the position's
noise from the decoder's table, as the reference shares its noise), the target
verifies step ``j`` of the window after a forward over the tokens committed up
to it, the window stops at the first step with a rejection (later drafted steps
are dropped), and the residual is drawn by uncapped rejection sampling; an
accepted or resampled trajectory's token is the target head's last step on it.
A bidirectional MAR gives the conditionals of successive steps only from
separate forwards, so this mode runs one target forward per committed step, as
the target alone does, plus the draft's: it is the correctness reference, not a
speed-up.

Reproduced: the statistics (tests/test_cspd.py); draft == target reproduces the
plain pipeline bit for bit in exact mode. Measured: docs/strategies/cspd.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from decodekit.continuous_speculative import (
    LastStepGaussian,
    diagonal_gaussian_log_prob,
    exact_verify,
    paper_verify,
)
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.second_model import check_second_model, same_weights
from decodekit.strategy import Params, Strategy
from pydantic import Field, field_validator
from torch import Tensor

MAX_GAMMA = 4096
EVAL_ROWS = 1 << 16
"""The most rows of one head call when `HeadDensity` evaluates trajectories."""
RESIDUAL_FIRST_ROUND = 4
"""Residual proposals per rejected token in the first round of `exact_verify`. A round
samples the target's head in ``S`` sequential calls, which cost about the same for a few
more rows; where a proposal is kept about 4 times in 5 (the zoo pair), four proposals
leave well under 1% of the rejected tokens for a second round."""


class CSpDParams(Params):
    """Parameters of `cspd` (the reference's: 4 draft steps per verification, prefill 15% of steps)."""

    draft: Any = Field(
        description="The draft MAR: zoo:<name> or a folder (a mar folder with model/ and vae/, "
        "or a MARModel folder with config.json), or, from Python, a MARModel on the "
        "pipeline's device and dtype. It must share the pipeline's token grid (seq_len, "
        "token_embed_dim), classes, head sampling steps and autoencoder.",
    )
    gamma: int = Field(
        4,
        ge=1,
        le=MAX_GAMMA,
        description="Draft steps per verification (the reference's num_draft; its demo uses 4). "
        "As in the reference, a window ends at a step that is a multiple of gamma or the last.",
    )
    prefill_ratio: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Steps s <= prefill_ratio * num_iter are the target's alone (the reference's "
        "ratio: 0.15 by default, 0.05 in its demo); step 0 always is.",
    )
    acceptance: Literal["paper", "exact"] = Field(
        "paper",
        description="'paper': the reference's rule with its approximations (fast, biased); "
        "'exact': trajectory densities, prefix-dependent acceptance, uncapped residual "
        "(the plain target's distribution, no faster than the target alone).",
    )

    @field_validator("draft")
    @classmethod
    def _draft(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("empty; give zoo:<name>, a folder, or a MARModel")
            return v
        if isinstance(v, Path):
            return str(v)
        from decodekit.pipelines.mar import MARModel

        if not isinstance(v, MARModel):
            raise ValueError(f"expected zoo:<name>, a folder or a MARModel, got {type(v).__name__}")
        return v


def load_draft(source: str, path: str, pipe: Any) -> Any:
    """The `MARModel` of ``source`` (zoo:<name>, a mar folder or a model folder), on ``pipe``'s device/dtype.

    A mar folder's ``vae/`` must hold the pipeline's autoencoder: a draft trained on
    another one's latents predicts other tokens.
    """
    from decodekit.config import resolve_model
    from decodekit.pipelines.mar import MARModel

    weight = next(pipe.model.parameters())
    folder = Path(resolve_model(source, path=path))
    if (folder / "model" / "config.json").is_file():
        check_same_vae(folder / "vae", pipe.vae, path)
        folder = folder / "model"
    elif not (folder / "config.json").is_file():
        raise ConfigError(
            path,
            f"{str(folder)!r} holds no MAR model: give a mar folder (with model/ and vae/) or a "
            "MARModel folder (config.json and model.safetensors), as MARPipeline.save_pretrained "
            "or `decodekit convert-mar` write them",
        )
    try:
        model = MARModel.from_pretrained(folder, torch_dtype=weight.dtype)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ConfigError(path, f"cannot load a MARModel from {str(folder)!r}: {e}") from None
    return model.to(weight.device).eval()


def check_same_vae(folder: Path, vae: Any, path: str) -> None:
    """Refuse a mar folder whose ``vae/`` weights are not ``vae``'s (to float16 precision)."""
    if not same_weights(folder / "diffusion_pytorch_model.safetensors", vae):
        raise ConfigError(
            path,
            f"the draft's folder holds another autoencoder ({str(folder)!r}) than the pipeline's; "
            "a draft predicts the latents of the autoencoder it was trained on, so it must share "
            "the pipeline's (the same vae/ weights)",
        )


class HeadDensity:
    """A MAR diffusion head's distribution over sampling trajectories at ``n`` positions.

    A `decodekit.continuous_speculative.TokenDensity`: a sample is a trajectory
    ``(S, D)`` = ``x_T, .., x_1`` (the states the head's Gaussians draw; ``x_0`` is the
    last step's mean, a function of ``x_1``); its density is the product of the
    steps' Gaussians ``N(x_{i-1}; mean_i(x_i), (std_i * temperature)^2)`` for
    ``i = S-1 .. 1`` (``x_T``'s standard normal is the same for every head and left out).
    """

    def __init__(
        self, head: Any, z: Tensor, z_uncond: Tensor | None, cfg: float, temperature: float
    ):
        self.head, self.z, self.z_uncond = head, z, z_uncond  # (n, Cd)
        self.cfg, self.temperature = cfg, temperature

    def _cond(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.z[index], None if self.z_uncond is None else self.z_uncond[index]

    def evaluate(self, traj: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(log_prob (M,), token (M, D))`` of trajectories ``(M, S, D)`` at positions ``index``.

        Every state of a trajectory is known, so all ``S`` steps' Gaussians come from
        one head call over ``S * M`` rows (at most `EVAL_ROWS` rows a call) instead
        of the sampler's ``S`` calls one after the other: the verification is
        parallel over the head's steps.
        """
        z, zu = self._cond(index)
        M, S = traj.shape[:2]
        per_call = max(1, EVAL_ROWS // S)
        log_ps, tokens = [], []
        for lo in range(0, M, per_call):
            part = slice(lo, lo + per_call)
            log_p, token = self._evaluate(traj[part], z[part], None if zu is None else zu[part])
            log_ps.append(log_p)
            tokens.append(token)
        return torch.cat(log_ps), torch.cat(tokens)

    def _evaluate(self, traj: Tensor, z: Tensor, zu: Tensor | None) -> tuple[Tensor, Tensor]:
        M, S, D = traj.shape
        x = traj.transpose(0, 1).reshape(S * M, D)  # step-major: x_T of every row first
        # the steps on the host: the schedule's numbers are indexed there, no device read
        steps = torch.arange(S - 1, -1, -1).repeat_interleave(M)
        rep = lambda c: c.repeat(S, 1)  # noqa: E731  (M, Cz) -> (S * M, Cz), step-major
        mean, log_var = self.head.step_distribution(
            x, steps, rep(z), self.cfg, None if zu is None else rep(zu)
        )
        mean, log_var = mean.view(S, M, D), log_var.view(S, M, D)
        std = (0.5 * log_var[:-1]).exp() * self.temperature  # the last step adds no noise
        nxt = traj[:, 1:].transpose(0, 1)  # (S - 1, M, D): x_{i-1} of step i
        log_p = diagonal_gaussian_log_prob(nxt, mean[:-1], std).double().sum(0)
        return log_p, mean[-1]

    def log_prob(self, traj: Tensor, index: Tensor) -> Tensor:
        return self.evaluate(traj, index)[0]

    def sample_with_log_prob(
        self, index: Tensor, generator: torch.Generator | list[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """Trajectories ``(M, S, D)`` drawn with fresh noise, and their log-densities ``(M,)``."""
        z, zu = self._cond(index)
        noise = self.head.draw_noise(index.numel(), generator, device=z.device, dtype=z.dtype)
        out = self.head.sample(
            z, self.temperature, self.cfg, z_uncond=zu, noise=noise, trajectory=True
        )
        return out.states[:-1].transpose(0, 1), trajectory_log_prob(out)  # x_T .. x_1

    def sample(self, index: Tensor, generator: torch.Generator | list[torch.Generator]) -> Tensor:
        return self.sample_with_log_prob(index, generator)[0]

    def token(self, traj: Tensor, index: Tensor) -> Tensor:
        """The token ``(M, D)`` of trajectories ``(M, S, D)``: the last step's mean at ``x_1``."""
        z, zu = self._cond(index)
        return self.head.step_distribution(traj[:, -1].contiguous(), 0, z, self.cfg, zu)[0]


def trajectory_log_prob(traj: Any) -> Tensor:
    """The density `HeadDensity` gives, from a `HeadTrajectory`'s own means and variances, ``(n,)``."""
    std = (0.5 * traj.log_variances[:-1]).exp() * traj.temperature  # the last step adds no noise
    log_q = diagonal_gaussian_log_prob(traj.states[1:-1], traj.means[:-1], std)  # (S - 1, n)
    return log_q.double().sum(0)


def last_step_gaussian(traj: Any) -> LastStepGaussian:
    """What the reference's ``DistributionManager`` records of a `HeadTrajectory` (``(n, D)`` each)."""
    lv = traj.log_variances  # (S, n, D)
    return LastStepGaussian(
        traj.means[-1],
        (0.5 * lv[-1]).exp() * traj.temperature,
        (0.5 * lv[:-1]).sum(0),
    )


def generator_groups(generators: list[torch.Generator]) -> list[list[int]]:
    """Rows grouped by generator object (one group per row with per-row generators)."""
    groups: dict[int, list[int]] = {}
    for b, g in enumerate(generators):
        groups.setdefault(id(g), []).append(b)
    return list(groups.values())


class CSpD(Strategy):
    """Continuous speculative decoding: a draft MAR proposes steps, the pipeline's MAR verifies them."""

    name = "cspd"
    loops = ("masked-autoregression",)
    Params = CSpDParams
    slot = "proposer"
    paper = "Continuous Speculative Decoding for Autoregressive Image Generation, arXiv:2411.11925"
    counters = ("windows", "draft_tokens", "accepted_tokens", "resampled_tokens",
                "dropped_tokens", "zero_tokens", "resample_tries", "target_forwards",
                "draft_forwards")  # fmt: skip

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self.path = path
        self.draft: Any = None
        self._counts: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def on_attach(self, run) -> None:
        adapter = run.adapter
        pipe, target = adapter.pipe, adapter.model
        draft = self.params.draft
        if isinstance(draft, str):
            draft = load_draft(draft, f"{self.path}.draft", pipe)
        check_second_model(draft, target, pipe, "the draft", f"{self.path}.draft")
        if draft.diffloss.num_steps != target.diffloss.num_steps:
            raise ConfigError(
                f"{self.path}.draft",
                f"the draft's head samples in {draft.diffloss.num_steps} steps, the pipeline's in "
                f"{target.diffloss.num_steps}; both read one noise table per position, so give "
                "them the same num_sampling_steps",
            )
        self.draft = draft.eval()
        self.reset(run)

    def on_detach(self, run) -> None:
        self.draft = None

    def reset(self, run) -> None:
        self._counts = {
            "windows": 0,
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "resampled_tokens": 0,
            "dropped_tokens": 0,
            "zero_tokens": 0,
            "resample_tries": 0,
        }
        self._decoder: Any = None
        self._draft_name: str | None = None

    def stats(self) -> dict[str, Any]:
        c = dict(self._counts)
        c.update(self.total_stats(c))  # the rate of this call's counts
        c["acceptance"] = self.params.acceptance
        decoder = self._decoder
        if decoder is not None:
            models = decoder.stats.get("models", {})
            c["target_forwards"] = models.get("model", {}).get("forwards", 0)
            c["draft_forwards"] = models.get(self._draft_name, {}).get("forwards", 0)
        return c

    def total_stats(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Drafted tokens kept over those verified (kept or resampled)."""
        verified = totals["accepted_tokens"] + totals["resampled_tokens"]
        return {"acceptance_rate": totals["accepted_tokens"] / verified if verified else None}

    # -- the loop ----------------------------------------------------------------------------
    def window(self, decoder: Any) -> int | None:
        """Steps of the window that starts at ``decoder.step``, or None during the prefill."""
        s, n = decoder.step, decoder.num_iter
        if s <= n * self.params.prefill_ratio:
            return None
        gamma = self.params.gamma
        end = min(n - 1, s + (-s) % gamma)  # the first multiple of gamma from s, or the last step
        return end - s + 1

    @hookimpl
    def decodekit_mar_step(self, run, decoder):
        self._decoder = decoder
        self._draft_name = decoder.model_name(self.draft)
        steps = self.window(decoder)
        if steps is None:
            return None
        self._counts["windows"] += 1
        if self.params.acceptance == "exact":
            if decoder.temperature == 0:
                raise ConfigError(
                    f"{self.path}.acceptance",
                    "'exact' compares the densities of the head's noisy steps, which need "
                    "temperature > 0; use temperature > 0 or acceptance: paper",
                )
            return self._exact_window(decoder, steps)
        return self._paper_window(decoder, steps)

    def _draft(self, decoder: Any, steps: int) -> list[tuple[Any, Tensor, Tensor | None]]:
        """Run the draft over ``steps`` steps from the decoder's state: per step its trajectory and z."""
        tokens, mask = decoder.tokens.clone(), decoder.mask.clone()  # (B, N, D), (B, N)
        drafted = []
        for j in range(steps):
            s = decoder.step + j
            pos = decoder.positions(s)  # (B, k)
            z, z_uncond = decoder.conditions(self.draft, tokens, mask)  # (B, N, Cd)
            traj = decoder.sample(self.draft, z, z_uncond, s, trajectory=True)  # B * k rows
            values = traj.sample.reshape(*pos.shape, -1)  # (B, k, D)
            tokens.scatter_(1, pos[..., None].expand_as(values), values.to(tokens.dtype))
            mask.scatter_(1, pos, False)
            drafted.append(
                (traj, gather(z, pos), None if z_uncond is None else gather(z_uncond, pos))
            )
            self._counts["draft_tokens"] += pos.numel()
        return drafted

    def _paper_window(self, decoder: Any, steps: int) -> int:
        start = decoder.step
        drafted = self._draft(decoder, steps)
        # one target forward over the tokens known before the window (the reference's
        # sample_tokens_step_with_mask with mask_target) and one head run over every drafted
        # position, guided with the last drafted step's scale (its cfg_iter), shared noise
        z, z_uncond = decoder.conditions(decoder.model, decoder.tokens, decoder.mask)
        last = start + steps - 1
        pos = torch.cat([decoder.positions(start + j) for j in range(steps)], 1)  # (B, W)
        ks = [decoder.positions(start + j).shape[1] for j in range(steps)]
        B, W = pos.shape
        traj_p = decoder.model.diffloss.sample(
            gather(z, pos),
            decoder.temperature,
            decoder.guidance(last),
            z_uncond=None if z_uncond is None else gather(z_uncond, pos),
            noise=gather(decoder.noise, pos),
            trajectory=True,
        )  # B * W rows, row-major
        p = LastStepGaussian(*(t.reshape(B, W, -1) for t in last_step_gaussian(traj_p)))
        per_row = lambda t, k: t.reshape(B, k, *t.shape[1:])  # noqa: E731  (B*k, ...) -> (B, k, ...)
        xs, qs = [], []
        for j, (traj_q, _, _) in enumerate(drafted):
            xs.append(per_row(traj_q.sample, ks[j]))
            qs.append(LastStepGaussian(*(per_row(t, ks[j]) for t in last_step_gaussian(traj_q))))
        x = torch.cat(xs, 1)  # (B, W, D), the window's tokens of each row in step order
        q = LastStepGaussian(*(torch.cat(t, 1) for t in zip(*qs)))
        out = torch.empty_like(x)
        for rows in generator_groups(decoder.generators):
            r = torch.tensor(rows, device=x.device)
            v = paper_verify(
                rows_flat(x, r),
                LastStepGaussian(*(rows_flat(t, r) for t in q)),
                LastStepGaussian(*(rows_flat(t, r) for t in p)),
                decoder.generators[rows[0]],
            )
            out[r] = v.samples.reshape(len(rows), -1, x.shape[-1])
            self._count(v)
        for values in torch.split(out, ks, dim=1):
            decoder.commit(values)
        return steps

    def _exact_window(self, decoder: Any, steps: int) -> int:
        drafted = self._draft(decoder, steps)
        B, head = decoder.batch, decoder.model.diffloss
        for j, (traj_q, _, _) in enumerate(drafted):
            s = decoder.step
            pos = decoder.positions(s)  # (B, k)
            k = pos.shape[1]
            # the target's forward over the tokens committed so far: its own step s
            z, z_uncond = decoder.conditions(decoder.model, decoder.tokens, decoder.mask)
            target = HeadDensity(
                head, gather(z, pos), None if z_uncond is None else gather(z_uncond, pos),
                decoder.guidance(s), decoder.temperature,
            )  # fmt: skip
            _, zq, zuq = drafted[j]
            draft = HeadDensity(
                self.draft.diffloss, zq, zuq, decoder.guidance(s), decoder.temperature
            )
            samples = traj_q.states[:-1].transpose(0, 1)  # (B * k, S, D): x_T .. x_1
            every = torch.arange(B * k, device=samples.device)
            log_p, token_p = target.evaluate(samples, every)  # one batched pass, as sampling's
            log_q = trajectory_log_prob(traj_q)
            values = token_p.reshape(B, k, -1).clone()  # (B, k, D)
            v = exact_verify(
                samples,
                draft,
                target,
                decoder.generators,  # each row draws from its own; densities for all rows at once
                rows=torch.arange(B, device=samples.device).repeat_interleave(k),
                independent=True,  # one step's tokens are independent given the context
                draft_log_prob=log_q,
                target_log_prob=log_p,
                first_round=RESIDUAL_FIRST_ROUND,
            )
            self._count(v)
            rejected = bool(v.resampled.any())
            if rejected:
                redo = v.resampled.nonzero().flatten()
                tokens = target.token(v.samples[redo], redo)
                values.view(B * k, -1)[redo] = tokens
            decoder.commit(values)
            if rejected:  # later drafted steps assumed the replaced tokens: drop them
                dropped = sum(d[0].states.shape[1] for d in drafted[j + 1 :])
                self._counts["dropped_tokens"] += dropped
                return j + 1
        return steps

    def _count(self, v: Any) -> None:
        c = self._counts
        sums = torch.stack([t.sum() for t in (v.accepted, v.resampled, v.failed, v.tries)])
        accepted, resampled, failed, tries = sums.tolist()  # one host read a verification
        c["accepted_tokens"] += accepted
        c["resampled_tokens"] += resampled
        c["zero_tokens"] += failed
        c["resample_tries"] += tries


def rows_flat(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` ``(B, W, D)`` at ``rows`` ``(R,)``, flattened to ``(R * W, D)``."""
    return x[rows].reshape(-1, x.shape[-1])


def gather(x: Tensor, pos: Tensor) -> Tensor:
    """``x`` ``(B, N, ...)`` at ``pos`` ``(B, k)``, flattened row-major to ``(B * k, ...)``."""
    B, k = pos.shape
    index = pos.reshape(B, k, *([1] * (x.dim() - 2))).expand(B, k, *x.shape[2:])
    return x.gather(1, index).reshape(B * k, *x.shape[2:])


@hookimpl
def decodekit_register_strategies(register):
    register(CSpD)


__all__ = ["CSpD", "CSpDParams", "HeadDensity", "load_draft"]
