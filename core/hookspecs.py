"""Every hook of decodekit, one docstring each.

Two families:

* **registration hooks** are implemented by plugin *modules* (built-in or third
  party, found through the ``decodekit`` entry-point group). The host passes a
  ``register`` callback and collects what each module hands it.
* **runtime hooks** are implemented by *strategy instances* attached to one run.
  Pipeline adapters call them at named points of their loop; strategies are
  called in the order the resolver fixed (``before``/``after``), never through
  pluggy's ``tryfirst``/``trylast``.

Hooks marked *first result* stop at the first strategy that returns something
other than ``None``.
"""

from __future__ import annotations

import pluggy

PROJECT = "decodekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegistrationSpecs:
    """Hooks a plugin module implements to add things to decodekit."""

    @hookspec
    def decodekit_register_strategies(self, register):
        """Call ``register(StrategyClass)`` for each strategy this plugin provides."""

    @hookspec
    def decodekit_register_pipelines(self, register):
        """Call ``register(AdapterClass)`` for each pipeline adapter this plugin provides."""

    @hookspec
    def decodekit_register_quality_metrics(self, register):
        """Call ``register(name, fn)``; ``fn(adapter_name, baseline, outputs, inputs)`` returns a dict of figures or None."""


class RuntimeSpecs:
    """Hooks the pipeline loops call; implemented as methods of `Strategy` subclasses."""

    # -- every loop ---------------------------------------------------------
    @hookspec
    def decodekit_call_start(self, run, call_kwargs):
        """A pipeline call begins; ``call_kwargs`` (a dict) may be edited in place before the call runs."""

    @hookspec
    def decodekit_call_end(self, run, output):
        """A pipeline call ended with ``output``."""

    # -- continuous denoising (diffusers UNet / DiT pipelines) ----------------
    @hookspec(firstresult=True)
    def decodekit_denoiser_forward(self, run, step, module, args, kwargs):
        """Before a denoiser call at loop step ``step``: return an output to serve it without running the denoiser (first result)."""

    @hookspec
    def decodekit_denoiser_output(self, run, step, module, args, kwargs, output):
        """After the denoiser ran for real at step ``step`` with ``output``."""

    @hookspec
    def decodekit_step_end(self, run, step, timestep, callback_kwargs):
        """After the scheduler step ``step``; edit ``callback_kwargs`` (``latents`` …) in place to change what the loop carries on with."""

    # -- masked-diffusion text -------------------------------------------------
    @hookspec(firstresult=True)
    def decodekit_mdm_forward(
        self,
        run,
        step,
        block_step,
        model,
        x,
        attention_mask,
        position_ids,
        mask_index,
        need_logits,
        logits_window,
    ):
        """Before the model call of loop step ``step`` (``block_step`` within the current block) on tokens ``x`` (B, L) with ``attention_mask``, ``position_ids`` (B, L), ``mask_index`` (B, L bool, still masked): return logits (B, L, V), valid at least where ``need_logits`` (B, L bool) is true, or ``(logits, tokens_computed)``, to serve it (first result). The caller reads columns ``lo..hi-1`` only, ``(lo, hi) = logits_window``; the logits may cover just those, (B, hi - lo, V)."""

    @hookspec(firstresult=True)
    def decodekit_mdm_select(self, run, step, policy):
        """Return the `RemaskingPolicy` that chooses this step's commits instead of the pipeline's ``policy``, or None to keep it (first result)."""

    @hookspec
    def decodekit_mdm_committed(self, run, step, x, committed):
        """Tokens ``committed`` (B, L bool) were written into ``x`` (B, L) at this step."""

    # -- token autoregression (transformers generate) --------------------------
    @hookspec(firstresult=True)
    def decodekit_generate(
        self,
        run,
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        model_kwargs,
    ):
        """Drive the whole decoding loop for ``generate(custom_generate=...)``; return what ``generate`` returns (first result)."""

    @hookspec
    def decodekit_logits_processors(self, run, generation_config):
        """Return a list of transformers ``LogitsProcessor`` to append for this call, or None."""

    @hookspec
    def decodekit_model_inputs(self, run, step, model_inputs):
        """Before each model forward of a token loop; edit ``model_inputs`` in place (drop or keep context, set the cache)."""

    # -- scale / continuous autoregression (VAR, MAR) ----------------------------
    @hookspec(firstresult=True)
    def decodekit_scale_model(self, run, scale_index, models):
        """Pick which model (from the dict ``models``) produces scale ``scale_index``; return its key (first result)."""

    @hookspec(firstresult=True)
    def decodekit_continuous_propose(self, run, step, context):
        """Propose continuous tokens for the next positions of a MAR-style loop; return (tokens, log_density) or None (first result)."""
