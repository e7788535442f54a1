"""Adapter `causal-lm`: transformers generation on causal LMs (and text-generation pipelines).

transformers owns the loop. decodekit wraps the model's ``generate`` (an
instance attribute, removed on detach) to mark where a call starts and ends,
to append the strategies' logits processors, and — when a strategy drives
decoding itself (``decodekit_generate``) — to pass a local callable as
``generate(custom_generate=...)`` so transformers still does all its set-up
(generation config, processors, stopping criteria, cache). A forward pre-hook
counts model calls and lets strategies edit each forward's inputs
(``decodekit_model_inputs``).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import TokenAutoregressionAdapter
from decodekit.pipeline import Inputs, KeyValueError, Options, check_prompts, short_repr
from decodekit.seeds import row_seeds
from pydantic import Field, field_validator

MAX_NEW_TOKENS = 65536
"""Most new tokens one config may ask for."""
_INT_MAX = 65536
# Ranges of the common ``generate`` keywords: (type, low, high, low included).
_EXTRA_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "num_beams": (int, 1, 64, True),
    "num_beam_groups": (int, 1, 64, True),
    "num_return_sequences": (int, 1, 64, True),
    "temperature": (float, 0.0, 100.0, False),
    "top_k": (int, 0, _INT_MAX * 4, True),
    "top_p": (float, 0.0, 1.0, False),
    "min_p": (float, 0.0, 1.0, True),
    "typical_p": (float, 0.0, 1.0, False),
    "repetition_penalty": (float, 0.0, 100.0, False),
    "length_penalty": (float, -100.0, 100.0, True),
    "diversity_penalty": (float, 0.0, 100.0, True),
    "no_repeat_ngram_size": (int, 0, _INT_MAX, True),
    "max_length": (int, 1, _INT_MAX, True),
    "min_length": (int, 0, _INT_MAX, True),
    "min_new_tokens": (int, 0, _INT_MAX, True),
}
_SET_BY_ADAPTER = {"max_new_tokens": "inputs.max_new_tokens", "do_sample": "inputs.do_sample"}


@functools.cache
def generate_keys() -> frozenset[str]:
    """The keywords ``inputs.extra`` may pass to ``generate``: `GenerationConfig`'s attributes."""
    from transformers import GenerationConfig

    keys = {k for k in GenerationConfig().to_dict() if not k.startswith("_")}
    return frozenset(keys - {"transformers_version"} - set(_SET_BY_ADAPTER))


def _check_extra_value(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise KeyValueError(key, f"must be a finite number, got {short_repr(value)}")
    if key not in _EXTRA_RANGES:
        return
    kind, low, high, low_included = _EXTRA_RANGES[key]
    ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise KeyValueError(
            key, f"must be {'a number' if kind is float else 'an integer'}, got {short_repr(value)}"
        )
    if not ((low <= value) if low_included else (low < value)) or value > high:
        bracket = "[" if low_included else "("
        raise KeyValueError(key, f"must be in {bracket}{low}, {high}], got {short_repr(value)}")


class CausalLMInputs(Inputs):
    """YAML ``inputs`` of a causal-lm pipeline (prompts and ``generate`` keyword arguments).

    Ranges are checked before the model loads; ``extra`` keys are checked
    against `GenerationConfig`'s attributes.
    """

    prompt: str | list[str] = Field(description="a non-empty prompt or list of prompts")
    max_new_tokens: int = Field(
        32, ge=1, le=MAX_NEW_TOKENS, description=f"tokens to generate, 1..{MAX_NEW_TOKENS}"
    )
    do_sample: bool = False
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="other keyword arguments of generate (temperature, top_k, num_beams ...)",
    )
    """Any other keyword argument of ``generate`` (``temperature``, ``top_k``, ``num_beams`` ...)."""

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        return check_prompts(v, empty_ok=False)

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: dict[str, Any], info) -> dict[str, Any]:
        import difflib

        for key, value in v.items():
            if not isinstance(key, str):
                raise ValueError(f"keys must be strings, got {short_repr(key)}")
            if key in _SET_BY_ADAPTER:
                raise KeyValueError(key, f"cannot be given in extra: set {_SET_BY_ADAPTER[key]}")
            if key not in generate_keys():
                close = difflib.get_close_matches(key, sorted(generate_keys()), n=1, cutoff=0.6)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise KeyValueError(
                    key, f"generate takes no {key!r} (not a GenerationConfig attribute).{hint}"
                )
            _check_extra_value(key, value)
        from transformers import GenerationConfig

        fixed = {k: info.data[k] for k in _SET_BY_ADAPTER if k in info.data}
        try:  # transformers' own cross-checks (num_return_sequences vs num_beams ...)
            GenerationConfig(**fixed, **v).validate(strict=False)
        except (ValueError, TypeError) as e:
            raise ValueError(" ".join(str(e).split())[:300]) from None
        return v


class CausalLMOptions(Options):
    """``pipeline.options`` of causal-lm: what `load` accepts, nothing else."""

    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="spread a model too large for one device over several (transformers' "
        "device_map: auto, balanced, sequential, or module name -> device); the model is then "
        "placed by it, not moved to pipeline.device",
    )


def _model_of(obj: Any) -> Any:
    from transformers import Pipeline, PreTrainedModel

    if isinstance(obj, Pipeline):
        obj = obj.model
    if isinstance(obj, PreTrainedModel) and hasattr(obj, "generate"):
        return obj
    return None


class CausalLMAdapter(TokenAutoregressionAdapter):
    """Attach to a transformers model's ``generate`` (or a text-generation pipeline's model)."""

    name = "causal-lm"
    loop = "token-autoregression"
    Inputs = CausalLMInputs
    Options = CausalLMOptions
    description = (
        "transformers causal LMs and text-generation pipelines (generate with custom_generate)"
    )

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.model = _model_of(target)
        self.step = 0  # model forwards in the current generate call
        self._saved: dict[str, Any] = {}

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return _model_of(obj) is not None

    def touched(self) -> list[Any]:
        return [self.model] if self.model is self.target else [self.target, self.model]

    def attach(self) -> None:
        model = self.model
        if not model.can_generate():
            raise AttachError(
                f"{type(model).__name__} cannot generate (no generation head); attach to a *ForCausalLM model."
            )
        self._saved = {
            "generate_in_dict": "generate" in model.__dict__,
            "generate_obj": model.__dict__.get("generate"),
        }
        original_generate = model.generate
        adapter = self

        def generate(*args: Any, **kwargs: Any) -> Any:
            return adapter.call_generate(original_generate, args, kwargs)

        generate.__doc__ = original_generate.__doc__
        self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        model.__dict__["generate"] = generate

    def detach(self) -> None:
        if not self._saved:
            return
        model = self.model
        self._handle.remove()
        if self._saved["generate_in_dict"]:
            model.__dict__["generate"] = self._saved["generate_obj"]
        else:
            model.__dict__.pop("generate", None)
        self._saved = {}

    # -- the loop ---------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        run = self.run
        step = self.step
        self.step += 1
        run.nfe += 1
        if run.has("decodekit_model_inputs"):
            run.call("decodekit_model_inputs", run=run, step=step, model_inputs=kwargs)
            return args, kwargs
        return None

    def call_generate(self, original_generate: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The wrapped ``generate``: per-call reset, strategies' processors and loop, guarded run.

        Positional arguments are bound to their names first, so ``call_kwargs``
        holds every argument: ``generate(ids)`` is seen as ``generate(input_ids=ids)``.
        """
        self.step = 0
        args, kwargs = self._named_arguments(original_generate, args, kwargs)
        return self.run.guarded_call(
            kwargs, lambda: self._generate_with_strategies(original_generate, args, kwargs)
        )

    def _named_arguments(
        self, original_generate: Any, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """``args`` bound to ``generate``'s parameter names; the prompt as ``input_ids``.

        transformers names the first parameter ``inputs``; for a model whose
        main input is ``input_ids`` it is passed on as ``input_ids=`` (which
        ``generate`` accepts alike). Arguments that do not bind are left as they
        are, for ``generate`` to refuse in its own words.
        """
        if not args:
            return args, kwargs
        try:
            bound = inspect.signature(original_generate).bind_partial(*args, **kwargs)
        except (TypeError, ValueError):
            return args, kwargs
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = bound.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                return args, kwargs  # a *args generate: positions have no names
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        main = getattr(self.model, "main_input_name", "input_ids")
        if "inputs" in named and main == "input_ids" and "input_ids" not in named:
            named["input_ids"] = named.pop("inputs")
        return (), named

    def _generate_with_strategies(
        self, original_generate: Any, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """After ``decodekit_call_start``: add the strategies' logits processors and loop, then generate."""
        run = self.run
        processors = [
            p
            for ps in run.call(
                "decodekit_logits_processors",
                run=run,
                generation_config=kwargs.get("generation_config"),
                input_ids=kwargs.get("input_ids", kwargs.get("inputs")),
            )
            for p in ps
        ]
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(
                list(kwargs.get("logits_processor") or []) + processors
            )
        if run.has("decodekit_generate"):
            if kwargs.get("custom_generate") is not None:
                raise AttachError(
                    "generate(custom_generate=...) was given while a decodekit strategy drives decoding "
                    f"({', '.join(s.name for s in run.strategies)}); pass one or the other."
                )

            def decodekit_loop(
                model,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                **model_kwargs,
            ):
                return run.call(
                    "decodekit_generate",
                    run=run,
                    model=model,
                    input_ids=input_ids,
                    logits_processor=logits_processor,
                    stopping_criteria=stopping_criteria,
                    generation_config=generation_config,
                    model_kwargs=model_kwargs,
                )

            kwargs["custom_generate"] = decodekit_loop
        return original_generate(*args, **kwargs)

    # -- YAML runs and bench -----------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str,
        dtype: str,
        options: dict[str, Any],
        trust_remote_code: bool = False,
    ) -> Any:
        from decodekit.config import check_options
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        opts = check_options(cls, options).model_dump(exclude_none=True)
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), local_files_only=True, **opts, **remote
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **remote)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if "device_map" not in opts:  # a device_map placed the layers already
            model = model.to(device)
        return pipeline("text-generation", model=model.eval(), tokenizer=tokenizer)

    @classmethod
    def generate(
        cls, target: Any, inputs: CausalLMInputs, progress: bool = False
    ) -> list[dict[str, Any]]:
        model, tokenizer = target.model, target.tokenizer
        if tokenizer is None:
            raise ConfigError(
                "pipeline.model",
                "the model folder has no tokenizer; add one (tokenizer.json) to the folder.",
            )
        prompts = [inputs.prompt] if isinstance(inputs.prompt, str) else list(inputs.prompt)
        kwargs = {
            "max_new_tokens": inputs.max_new_tokens,
            "do_sample": inputs.do_sample,
            "pad_token_id": tokenizer.pad_token_id,
            **_ranking_kwargs(model, inputs),
            **inputs.extra,
        }
        if kwargs["do_sample"]:
            # generate samples from torch's global generator, one for the whole batch: each
            # prompt runs alone, seeded from the prompt itself (decodekit.seeds), not its index
            groups = [([p], s) for p, s in zip(prompts, row_seeds(inputs.seed, prompts))]
        else:
            groups = [(prompts, inputs.seed)]
        stops = _stop_ids(model, kwargs)
        results = []
        for group, seed in groups:
            enc = tokenizer(group, return_tensors="pt", padding=True).to(model.device)
            torch.manual_seed(seed)
            out = model.generate(**enc, **kwargs)
            sequences = out.sequences if hasattr(out, "sequences") else out
            new = sequences[:, enc["input_ids"].shape[1] :]  # (rows, new tokens): no prompt pads
            rows = []
            for i, row in enumerate(new.tolist()):
                tokens = _until_stop(row, stops)
                rows.append(
                    {
                        "prompt": group[i * len(group) // len(new)],
                        "text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "tokens": tokens,
                    }
                )
            results += _ranked(rows, getattr(out, "sequences_scores", None), len(group))
        return results


def _ranking_kwargs(model: Any, inputs: CausalLMInputs) -> dict[str, Any]:
    """``generate`` arguments that return ``sequences_scores`` when a call may give several
    rows per prompt (``num_return_sequences > 1``, or a strategy that drives decoding, such as
    diverse-beam's beams or superposed's drafts): saved as each row's rank and score. Other
    calls do not ask for scores, which would keep every step's logits in memory."""
    from decodekit.session import attached_run

    run = attached_run(model)
    several = int(inputs.extra.get("num_return_sequences") or 1) > 1
    if several or (run is not None and run.has("decodekit_generate")):
        return {"return_dict_in_generate": True, "output_scores": True}
    return {}


def _ranked(rows: list[dict[str, Any]], scores: Any, prompts: int) -> list[dict[str, Any]]:
    """With several rows per prompt and their ``sequences_scores``: each prompt's rows best
    first, with ``rank`` (0 = best) and ``score`` (the strategy's, e.g. a beam's length-normalised
    log-probability). One row per prompt, or no scores: the rows unchanged."""
    per = len(rows) // prompts if prompts else 0
    if scores is None or per < 2 or per * prompts != len(rows) or len(scores) != len(rows):
        return rows
    values = [float(v) for v in scores.tolist()]
    ranked = []
    for p in range(prompts):
        block = list(range(p * per, (p + 1) * per))
        block.sort(key=lambda i: -values[i])  # stable: ties keep the strategy's order
        ranked += [{**rows[i], "rank": r, "score": values[i]} for r, i in enumerate(block)]
    return ranked


def _stop_ids(model: Any, kwargs: dict[str, Any]) -> set[int]:
    """The end-of-sequence token ids that end a row of ``generate``."""
    eos = kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence token.

    A batched ``generate`` fills a row that ended early with pad tokens until the
    longest row ends; alone, the row stops at its end-of-sequence token. Cutting
    there gives the same tokens batched or alone.
    """
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


@hookimpl
def decodekit_register_pipelines(register):
    register(CausalLMAdapter)
