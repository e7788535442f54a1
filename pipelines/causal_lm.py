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

from typing import Any

import torch
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import TokenAutoregressionAdapter
from decodekit.pipeline import Inputs
from decodekit.seeds import row_seeds


class CausalLMInputs(Inputs):
    """YAML ``inputs`` of a causal-lm pipeline (prompts and ``generate`` keyword arguments)."""

    prompt: str | list[str]
    max_new_tokens: int = 32
    do_sample: bool = False
    extra: dict[str, Any] = {}
    """Any other keyword argument of ``generate`` (``temperature``, ``top_k``, ``num_beams`` ...)."""


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
        """The wrapped ``generate``: per-call reset, strategies' processors and loop, guarded run."""
        self.step = 0
        return self.run.guarded_call(
            kwargs, lambda: self._generate_with_strategies(original_generate, args, kwargs)
        )

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
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), local_files_only=True, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return pipeline("text-generation", model=model.to(device).eval(), tokenizer=tokenizer)

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
            for i, row in enumerate(new.tolist()):
                tokens = _until_stop(row, stops)
                results.append(
                    {
                        "prompt": group[i * len(group) // len(new)],
                        "text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "tokens": tokens,
                    }
                )
        return results


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
