"""Where a cspd call's time goes on the zoo's MAR pair: forwards, head loops, evaluation, residual.

Times one call of zoo:shapes-mar alone and one with ``cspd`` (draft zoo:shapes-mar-small)
after a warm-up call each, with the wall time of every transformer forward
(`MARDecoder.conditions`), every head loop the decoder runs (`MARDecoder.sample`: the
target's own steps and the draft's), every parallel trajectory evaluation
(`HeadDensity.evaluate`) and every round of residual target samples
(`HeadDensity.sample_with_log_prob`) summed. The rest of a cspd call is the `paper`
rule's one target head loop per window and the verification arithmetic.

    .venv/bin/python benchmarks/cspd_time_split.py --acceptance exact [--gamma 4] [--num-iter 16]
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acceptance", choices=["paper", "exact"], default="exact")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--num-iter", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=6.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import decodekit
    import decodekit.plugins.cspd as cspd
    from decodekit.config import resolve_model
    from decodekit.pipelines.mar_pipeline import MARDecoder, MARPipeline

    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for owner, name, label in [
        (MARDecoder, "conditions", "transformer forwards"),
        (MARDecoder, "sample", "head loops run by the decoder (target steps, draft steps)"),
        (cspd.HeadDensity, "evaluate", "parallel trajectory evaluations"),
        (cspd.HeadDensity, "sample_with_log_prob", "residual rounds (target head samples)"),
    ]:
        inner = getattr(owner, name)

        def timed(*a, _inner=inner, _label=label, **k):
            start = time.perf_counter()
            out = _inner(*a, **k)
            seconds[_label] += time.perf_counter() - start
            calls[_label] += 1
            return out

        setattr(owner, name, timed)

    pipe = MARPipeline.from_pretrained(resolve_model("zoo:shapes-mar"))
    sampling = dict(num_iter=args.num_iter, cfg=args.cfg, output_type="latents")

    def call() -> dict:
        gens = [torch.Generator().manual_seed(i) for i in range(args.rows)]
        call_ = lambda: pipe(list(range(args.rows)), generator=gens, **sampling)  # noqa: E731
        call_()  # warm-up
        gens[:] = [torch.Generator().manual_seed(i) for i in range(args.rows)]
        seconds.clear()
        calls.clear()
        start = time.perf_counter()
        call_()
        total = time.perf_counter() - start
        split = {k: {"seconds": round(v, 3), "calls": calls[k]} for k, v in seconds.items()}
        return {"seconds": round(total, 3), "split": split}

    result = {"target alone": call()}
    params = {"draft": "zoo:shapes-mar-small", "gamma": args.gamma, "acceptance": args.acceptance}
    with decodekit.attach(pipe, [{"name": "cspd", "params": params}]):
        result[f"cspd {args.acceptance}"] = call()
    print(json.dumps({"args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
