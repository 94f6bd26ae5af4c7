"""Purification cost: a purified Stage-1 step vs a plain CE step, per PEFT variant.

Both steps run on the same batch and model in this process, interleaved
(plain, purified, plain, ...) ``--repeats`` times after a warm-up; the ratio
is median(purified) / median(plain). The purified step is ``stage1_step``
with ``align = "tkl"`` (one forward, the TKL solve, both gradients in one
batched backward pass, purification, SGD step); the plain step is the same
function with ``align = "none"`` (one forward, one backward, SGD step).
Target: <= 1.5x.

It also times the two ways of getting both gradients: ONE batched backward
pass (``torch.autograd.grad`` with ``is_grads_batched=True`` on the stacked
losses, what ``stage1_step`` does) against two ``autograd.grad`` calls, and
reports the largest difference between the gradients of the two ways; and the
TKL temperature solve of the batch by bisection against the default number of
probes per round (``tkl.default_probes``), with the largest tau difference.

    python bench/purification.py [--variants prompt,adapter,lora] [--repeats 30] [--batch 16] [--threads 1]
                                 [--model ViT-B-16]

``--model`` times an open_clip architecture at its real size (random initial
weights, see ``bench/real_size.py``) instead of the embedded tiny CLIP.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import client_inputs, model, run_cfg, stage1_options  # noqa: E402
from real_size import run_config  # noqa: E402

from fedpurel_app.tkl import default_probes, entropy, solve_temperature, temperature_aligned_kl  # noqa: E402
from fedpurel_app.training import stage1_step  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _losses(model, x, y, z, opts):
    logits = model.global_logits(x).float()
    task_loss = F.cross_entropy(logits, y)
    align_loss = temperature_aligned_kl(
        logits,
        z,
        aligned=True,
        tau_min=opts.tau_min,
        tau_max=opts.tau_max,
        tol=opts.tau_tol,
        max_iter=opts.tau_max_iter,
    )
    return task_loss, align_loss


def two_calls(model, x, y, z, opts):
    params = model.global_parameters()
    task_loss, align_loss = _losses(model, x, y, z, opts)
    gt = torch.autograd.grad(task_loss, params, retain_graph=True)
    ga = torch.autograd.grad(align_loss, params, allow_unused=True)
    return gt, ga


def batched(model, x, y, z, opts):
    params = model.global_parameters()
    task_loss, align_loss = _losses(model, x, y, z, opts)
    stacked = torch.stack([task_loss, align_loss])
    grads = torch.autograd.grad(stacked, params, grad_outputs=torch.eye(2), is_grads_batched=True, allow_unused=True)
    return tuple(g[0] for g in grads), tuple(g[1] for g in grads)


def solve_times(model, x, z, opts, repeats: int) -> dict:
    """The TKL temperature solve of one batch (f and z stacked, as ``aligned_temperatures`` runs it):
    plain bisection (``points=1``) against the default probes per round, interleaved."""
    with torch.no_grad():
        f = model.global_logits(x).float()
    both = torch.cat([f, z.float()])
    h_star = 0.5 * (entropy(f) + entropy(z.float()))
    target = torch.cat([h_star, h_star])
    kw = dict(tau_min=opts.tau_min, tau_max=opts.tau_max, tol=opts.tau_tol, max_iter=opts.tau_max_iter)
    k = default_probes(both.shape[-1], both.device)
    times = {1: [], k: []}
    for r in range(repeats + 3):
        for points in times:
            t = _timed(lambda p=points: [solve_temperature(both, target, points=p, **kw) for _ in range(20)]) / 20
            if r >= 3:
                times[points].append(t)
    gap = float(
        (solve_temperature(both, target, points=1, **kw) - solve_temperature(both, target, points=k, **kw)).abs().max()
    )
    return {
        "rows": tuple(both.shape),
        "points": k,
        "bisection_ms": 1e3 * statistics.median(times[1]),
        "probed_ms": 1e3 * statistics.median(times[k]),
        "max_gap": gap,
        "tol": opts.tau_tol,
    }


def bench_variant(variant: str, batch: int, repeats: int, model_name: str | None = None) -> dict:
    cfg = run_cfg({"peft.name": variant, **run_config(model_name)})
    clip, peft = model(cfg)
    _, train, _ = client_inputs(cfg, clip, 0, 20)
    idx = torch.arange(min(batch, len(train)))
    x, y, z = train.features[idx], train.labels[idx], train.zero_shot_logits[idx]
    start_state = peft.global_state()
    params = peft.global_parameters()
    base = stage1_options(cfg, clip)
    purified_opts = replace(base, align="tkl")
    plain_opts = replace(base, align="none")

    def step(opts):
        peft.load_global_state(start_state)  # the same model every time
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
        return _timed(lambda: stage1_step(peft, x, y, z, opt, opts))

    for _ in range(1 if model_name else 3):  # warm-up (one step of a real-size model is long enough)
        step(plain_opts), step(purified_opts)
        two_calls(peft, x, y, z, base), batched(peft, x, y, z, base)
    plain, purified, two, one = [], [], [], []
    for _ in range(repeats):
        plain.append(step(plain_opts))
        purified.append(step(purified_opts))
        peft.load_global_state(start_state)
        two.append(_timed(lambda: two_calls(peft, x, y, z, base)))
        one.append(_timed(lambda: batched(peft, x, y, z, base)))
    peft.load_global_state(start_state)
    (gt2, ga2), (gt1, ga1) = two_calls(peft, x, y, z, base), batched(peft, x, y, z, base)
    diff = max(
        float((a - b).abs().max())
        for pair in ((gt2, gt1), (ga2, ga1))
        for a, b in zip(*pair, strict=True)
        if a is not None and b is not None
    )
    identical = all(
        torch.equal(a, b)
        for pair in ((gt2, gt1), (ga2, ga1))
        for a, b in zip(*pair, strict=True)
        if a is not None and b is not None
    )
    n_params = sum(p.numel() for p in params)
    med = statistics.median
    solve = solve_times(peft, x, z, base, repeats)
    return {
        "solve": solve,
        "variant": variant,
        "params": n_params,
        "inputs": tuple(x.shape),
        "plain_ms": 1e3 * med(plain),
        "purified_ms": 1e3 * med(purified),
        "ratio": med(purified) / med(plain),
        "two_ms": 1e3 * med(two),
        "batched_ms": 1e3 * med(one),
        "batched_ratio": med(one) / med(two),
        "max_diff": diff,
        "identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="prompt,adapter,lora")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="an open_clip architecture at its real size (random weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = f"{args.model} (random initial weights)" if args.model else "the embedded tiny CLIP"
    print(
        f"config: embedded default (mnist-animals, 20 classes), {model}, client 0 of 20, batch {args.batch}, "
        f"threads {args.threads}, {args.repeats} interleaved repeats, medians"
    )
    for variant in args.variants.split(","):
        r = bench_variant(variant, args.batch, args.repeats, args.model)
        print(
            f"{r['variant']:8s} phi_g {r['params']:>6d} params, inputs {r['inputs']}: "
            f"plain step {r['plain_ms']:.2f} ms | purified step {r['purified_ms']:.2f} ms | "
            f"ratio {r['ratio']:.2f}x (target <= 1.5x)"
        )
        print(
            f"{'':8s} gradients: two autograd.grad calls {r['two_ms']:.2f} ms | one batched "
            f"(is_grads_batched) {r['batched_ms']:.2f} ms | batched/two {r['batched_ratio']:.2f}x | "
            f"max |diff| {r['max_diff']:.2e} (bitwise identical: {r['identical']})"
        )
        sv = r["solve"]
        print(
            f"{'':8s} TKL temperature solve of the batch's stacked f and z {sv['rows']}: bisection "
            f"{sv['bisection_ms']:.3f} ms | {sv['points']} probes per round {sv['probed_ms']:.3f} ms | "
            f"bisection/probed {sv['bisection_ms'] / sv['probed_ms']:.2f}x | max |tau difference| "
            f"{sv['max_gap']:.1e} (tol {sv['tol']:g})",
            flush=True,
        )


if __name__ == "__main__":
    main()
