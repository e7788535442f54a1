"""Every hook of decodekit, one docstring each.

Two families:

* **registration hooks** are implemented by plugin *modules* (built-in or third
  party, found through the ``decodekit`` entry-point group). The host passes a
  ``register`` callback and collects what each module hands it.
* **runtime hooks** are implemented by *strategy instances* attached to one run.
  Pipeline adapters call them at named points of their loop; strategies are
  called one after another in the order the resolver fixed
  (``before``/``after``). Implementations marked with pluggy's ``wrapper``,
  ``hookwrapper``, ``tryfirst``, ``trylast`` or ``specname`` are refused when
  the strategy is registered or attached, with the plugin and hook named.

Hooks marked *first result* stop at the first strategy that returns something
other than ``None``.
"""

from __future__ import annotations

import pluggy

PROJECT = "decodekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


UNSUPPORTED_IMPL_OPTIONS = ("wrapper", "hookwrapper", "tryfirst", "trylast", "specname")
"""pluggy hookimpl options decodekit does not honour: it calls hooks itself, in a fixed order."""


def unsupported_options(impl) -> list[str]:
    """The `UNSUPPORTED_IMPL_OPTIONS` that the hookimpl ``impl`` is marked with."""
    opts = getattr(impl, PROJECT + "_impl", None) or {}
    return [o for o in UNSUPPORTED_IMPL_OPTIONS if opts.get(o)]


def argument_mismatch(impl, spec) -> str | None:
    """Why ``impl`` cannot be called as hook ``spec`` (an argument the hook does not pass), or None."""
    import inspect

    try:
        takes = list(inspect.signature(impl).parameters)
    except (TypeError, ValueError):
        return None
    if takes and takes[0] in ("self", "cls") and not inspect.ismethod(impl):
        takes = takes[1:]
    given = [p for p in inspect.signature(spec).parameters if p != "self"]
    unknown = [p for p in takes if p not in given]
    if not unknown:
        return None
    return (
        f"takes {', '.join(unknown)}, which the hook does not pass "
        f"(it passes {', '.join(given)}); rename the argument or drop it."
    )


class RegistrationSpecs:
    """Hooks a plugin module implements to add things to decodekit."""

    @hookspec
    def decodekit_register_strategies(self, register):
        """Call ``register(StrategyClass)`` for each strategy this plugin provides.

        The class must be a `Strategy` subclass with a non-empty ``name`` whose
        runtime hooks decodekit can call (see `decodekit.strategy.check_hooks`).
        Two plugins registering one name: the second is reported under *failed*
        by ``decodekit plugins``, the first stays; built-in names are reserved,
        so a third-party class under a built-in's name is always the one refused.

        Called by: the plugin manager, when it loads plugins.
        """

    @hookspec
    def decodekit_register_pipelines(self, register):
        """Call ``register(AdapterClass)`` for each pipeline adapter this plugin provides.

        An adapter subclasses the contract class of its loop
        (`decodekit.loops`). `decodekit.attach` picks the first registered
        adapter whose ``matches(obj)`` is true, unless ``pipeline=`` names one.

        Called by: the plugin manager, when it loads plugins.
        """

    @hookspec
    def decodekit_register_quality_metrics(self, register):
        """Call ``register(name, fn)``; ``fn(adapter_name, baseline, outputs, inputs)`` returns a dict of figures or None.

        The figures compare a strategy's outputs with the baseline outputs of
        the same inputs; None when the metric does not apply to that adapter.

        Called by: the plugin manager; ``decodekit bench`` runs each metric
        after the adapter's own ``quality()`` and reports it under its name.
        """


class RuntimeSpecs:
    """Hooks the pipeline loops call; implemented as methods of `Strategy` subclasses.

    Each docstring ends with the built-in adapters that call the hook
    (``Called by:``); a test checks that list against the adapters' code.
    """

    # -- every loop ---------------------------------------------------------
    @hookspec
    def decodekit_call_start(self, run, call_kwargs):
        """A pipeline call begins; ``call_kwargs`` (a dict) may be edited in place before the call runs.

        ``call_kwargs`` are the keyword arguments of ``pipe(...)`` (diffusers) or
        ``generate(...)`` (transformers). Called after every strategy's
        ``reset(run)``, once per call.

        Called by: stable-diffusion, diffusion-transformer, masked-diffusion-lm, llada2,
        causal-lm, ar-image, var, mar.
        """

    @hookspec
    def decodekit_call_end(self, run, output):
        """A pipeline call returned ``output`` (the pipeline's own return value).

        Called once per call that did not raise, before ``run.last`` is filled.
        Undo per-call changes to the pipeline here.

        Called by: stable-diffusion, diffusion-transformer, masked-diffusion-lm, llada2,
        causal-lm, ar-image, var, mar.
        """

    # -- continuous denoising (diffusers UNet / DiT pipelines) ----------------
    @hookspec(firstresult=True)
    def decodekit_denoiser_forward(self, run, step, role, module, args, kwargs):
        """Before a model call of loop step ``step``: return an output to serve it without running ``module`` (first result).

        ``role`` says which model the call is for: ``"denoiser"`` (the UNet or
        transformer; ``step`` counts these calls — on diffusion-transformer it is
        the loop iteration, which Flux's two true-CFG calls share) or
        ``"controlnet"`` (a ControlNet, whose call feeds the denoiser call of the
        same ``step``).
        ``args``/``kwargs`` are the call's arguments as the pipeline passed them
        (``sample``, ``timestep``, ``encoder_hidden_states`` …). Return what the
        module would return for them — e.g. ``(noise_pred,)`` under
        ``return_dict=False`` — to serve the call (it then counts in
        ``run.served``, ControlNet calls in ``run.adapter.aux_served``); return
        None to let it run.

        Called by: stable-diffusion, diffusion-transformer.
        """

    @hookspec
    def decodekit_denoiser_output(self, run, step, role, module, args, kwargs, output):
        """After ``module`` (of ``role``) ran for real at step ``step`` and returned ``output``.

        Not called for served calls. Feature caches record what they need here.

        Called by: stable-diffusion, diffusion-transformer.
        """

    @hookspec
    def decodekit_step_end(self, run, step, timestep, callback_kwargs):
        """After the scheduler step ``step``; edit ``callback_kwargs`` (``latents`` …) in place to change what the loop carries on with.

        Runs through diffusers' ``callback_on_step_end``; ``timestep`` is the
        scheduler's ``t``. ``callback_kwargs`` holds ``latents`` and every name
        in the attached strategies' ``step_tensors``; assign new tensors into it.
        Attaching fails with `AttachError` when the pipeline has no
        ``callback_on_step_end`` or does not expose a requested tensor. A user's
        own ``callback_on_step_end`` still runs, after the strategies.

        Called by: stable-diffusion, diffusion-transformer.
        """

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
        """Before the model call of loop step ``step``: return logits to serve it (first result).

        ``block_step`` counts steps within the current block; ``x`` (B, L) are
        the tokens, ``attention_mask`` and ``position_ids`` (B, L) the model's
        inputs, ``mask_index`` (B, L bool) the positions still masked. Return
        logits (B, L, V), valid at least where ``need_logits`` (B, L bool) is
        true, or ``(logits, tokens_computed)``. The caller reads columns
        ``lo..hi-1`` only, ``(lo, hi) = logits_window``; the logits may cover
        just those, (B, hi - lo, V), which saves most of the vocabulary-sized
        work of a step. The served call counts in ``run.served``.

        masked-diffusion-lm passes the current block as the window (one column
        to the left with Dream's shift) and, with classifier-free guidance, the
        conditional and unconditional rows stacked (2B rows); llada2 passes
        ``(0, L)`` and needs valid logits on the whole current block.

        Called by: masked-diffusion-lm, llada2.
        """

    @hookspec(firstresult=True)
    def decodekit_mdm_select(self, run, step, policy):
        """Return the `RemaskingPolicy` that chooses this step's commits instead of the pipeline's ``policy``, or None to keep it (first result).

        ``parallel-threshold`` returns the confidence-threshold policy here.

        Called by: masked-diffusion-lm (llada2 commits with diffusers'
        scheduler and refuses strategies that implement this hook).
        """

    @hookspec
    def decodekit_mdm_committed(self, run, step, x, committed):
        """Tokens ``committed`` (B, L bool) were written into ``x`` (B, L) at this step.

        Where a delayed-commit cache learns which positions were just decoded.

        Called by: masked-diffusion-lm.
        """

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
        """Drive the whole decoding loop as ``generate(custom_generate=...)``; return what ``generate`` returns (first result).

        When any attached strategy implements this hook, the adapter passes a
        callable as ``generate(custom_generate=...)``: transformers first
        prepares ``logits_processor``, ``stopping_criteria``,
        ``generation_config`` and ``model_kwargs`` (attention mask, cache), then
        hands them over. Return a ``LongTensor`` of sequences or a
        ``GenerateOutput``. A user's own ``custom_generate`` alongside such a
        strategy is an `AttachError`.

        Called by: causal-lm.
        """

    @hookspec
    def decodekit_logits_processors(self, run, generation_config, input_ids):
        """Return a list of transformers ``LogitsProcessor`` to append for this call, or None.

        Called once at the start of each ``generate`` call; the processors run
        after the user's own ``logits_processor``. ``input_ids`` is the call's
        prompt tensor (given by name or positionally), or None when the call
        passed none (``inputs_embeds``); ``generation_config`` is the call's own,
        or None. An implementation may take any subset of the arguments.

        Called by: causal-lm.
        """

    @hookspec
    def decodekit_model_inputs(self, run, step, model_inputs):
        """Before each model forward of a token loop; edit ``model_inputs`` (a dict) in place.

        A forward pre-hook on the model; ``step`` counts forwards within the
        ``generate`` call. Drop or keep context tokens, set ``past_key_values``.

        Called by: causal-lm.
        """

    @hookspec(firstresult=True)
    def decodekit_image_tokens(self, run, decoder):
        """Decode the image span of an image-token AR pipeline with ``decoder``; return the codes ``(B, N)`` or None (first result).

        ``decoder`` is an `ImageTokenDecoder` (``decodekit.pipelines.ar_image``),
        already prefilled with the prompts: ``probs_after(tokens)`` verifies
        tokens after each row's committed prefix in one forward (guidance,
        processors and constraints applied), ``commit(num, tokens=None)`` keeps
        a prefix per row and rolls the rest of its K/V back, ``generators`` has
        one generator per row. Return ``decoder.codes`` once every row is
        complete, or None to let the pipeline decode what is left token by
        token (``decoder.decode_plain()``).

        Called by: ar-image.
        """

    # -- scale autoregression (VAR) ------------------------------------------------
    @hookspec
    def decodekit_scale_models(self, run, plan):
        """Before the first scale of a call: choose which model runs which scale by editing ``plan.models`` in place.

        ``plan`` is a ``ScalePlan`` (``decodekit.pipelines.var``); its ``models``
        list has one ``VARTransformer`` per scale, the pipeline's at first. A
        model that did not run the scale before its first one is prefilled over
        every earlier scale in one block-causal forward (the previous model's K/V
        freed first) and samples from its entry scale on with the same per-row
        generators; a drafter/refiner split is ``plan.models[n:] = [refiner] * (K - n)``.
        Every model must fit the pipeline's VQ (``patch_nums``, ``vocab_size``,
        ``vae_embed_dim``) and ``num_classes``.

        Called by: var.
        """

    @hookspec
    def decodekit_scale_end(self, run, scale, model, tokens):
        """Scale ``scale`` was sampled by ``model``: ``tokens`` ``(B, pn*pn)`` long.

        Where a strategy measures each model's share (time, memory);
        ``run.adapter.decoder`` holds the call's state (token maps, ``f_hat``,
        the live model and its cache).

        Called by: var.
        """

    # -- masked autoregression over continuous tokens (MAR) ----------------------------------------
    @hookspec(firstresult=True)
    def decodekit_mar_step(self, run, decoder):
        """Advance the MAR loop from ``decoder.step`` yourself and return the steps done, or None for one plain step (first result).

        Called before each step while ``decoder.step < decoder.num_iter``.
        ``decoder`` is the call's ``MARDecoder`` (``decodekit.pipelines.mar_pipeline``):

        - state: ``tokens`` ``(B, N, D)`` (zeros where unknown), ``mask`` ``(B, N)``
          bool (True: unknown), ``orders`` ``(B, N)`` (each row's random order),
          ``noise`` ``(B, N, S, D)`` (the head noise of each position, drawn with
          the row's generator, so a position's sample is a function of its
          condition), ``step``, ``num_iter``, ``class_labels``, ``cfg``,
          ``cfg_schedule``, ``temperature``, ``generators`` (one per row, for a
          strategy's own draws), ``model`` (the pipeline's ``MARModel``);
        - schedule: ``positions(step)`` ``(B, k)`` the positions step ``step``
          reveals, ``masked_after(step)`` how many stay unknown after it,
          ``guidance(step)`` its guidance scale (constant or MAR's linear ramp);
        - work: ``conditions(model, tokens=None, mask=None)`` one forward of any
          ``MARModel`` (null-class rows added under guidance), returning ``(z,
          z_uncond)`` ``(B, N, Cd)`` each, ``z_uncond`` None when unguided;
          ``sample(model, z, z_uncond, step, trajectory=False)`` the head's
          tokens ``(B, k, D)`` at ``positions(step)`` from the noise table (or a
          ``HeadTrajectory`` over their ``B * k`` rows, row-major, as
          ``gather_step(x, step)`` picks rows of any ``(B, N, ...)`` tensor);
          ``commit(values)`` writes ``(B, k, D)`` at ``positions(step)``, unmasks
          them and advances ``step`` by one; ``run_step(model)`` is one plain step.

        Return how many steps you committed (at least 1), or None to let the
        pipeline run step ``decoder.step`` plainly (e.g. during a prefill phase).
        Forwards through ``decoder.conditions`` count in ``run.nfe`` and in
        ``decoder.forwards`` per model (``decoder.stats``).

        Called by: mar.
        """
