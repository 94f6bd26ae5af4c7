"""Cached image features: a Stage-1 epoch on cached features vs one that recomputes them every step.

The same client, model, batches (same seed) and purified ``stage1_step`` in both
epochs; the only difference is where the image features of a batch come from:

- cached: the client's features computed once (what the app does for prompt and
  adapter, whose image encoder is frozen);
- encoder in the loop: each batch's images go through the frozen image encoder
  (``encode_image(normalize=True)``, no gradient) before the step; "+ preprocess"
  also runs CLIP's preprocessing (PIL -> tensor) per batch, as a loop without any
  cache would.

The epochs are interleaved ``--repeats`` times; ratios are of medians, and the
largest difference between recomputed and cached features is printed. Target:
>= 10x on the embedded default (prompt).

    python bench/feature_epoch.py [--variants prompt,adapter] [--repeats 5] [--client -1 (largest)]
                                  [--model ViT-B-16] [--threads 1]

``--model`` times an open_clip architecture at its real size (random initial
weights, see ``bench/real_size.py``) instead of the embedded tiny CLIP.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import client_inputs, model, run_cfg, stage1_options  # noqa: E402
from real_size import run_config  # noqa: E402

from fedpurel_app.data.client import fedlt_split  # noqa: E402
from fedpurel_app.models import preprocess_images  # noqa: E402
from fedpurel_app.training import seeded_generator, stage1_step  # noqa: E402


def epoch(peft, data, cfg, opts, features_of) -> float:
    """One Stage-1 epoch; ``features_of(idx)`` gives a batch's image features."""
    optimizer = torch.optim.SGD(
        peft.global_parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
    )
    start = time.perf_counter()
    for idx in data.batches(cfg.train.batch_size, seeded_generator(cfg.seed, 1, 1, 0)):
        stage1_step(peft, features_of(idx), data.labels[idx], data.zero_shot_logits[idx], optimizer, opts)
    return time.perf_counter() - start


def bench_variant(variant: str, args: argparse.Namespace) -> None:
    """Time the epochs of one variant and print them."""
    cfg = run_cfg({"peft.name": variant, **run_config(args.model)})
    if args.client < 0:
        sizes = [len(t) for t in fedlt_split(cfg.data, cfg.seed, args.clients).client_train]
        args.client = max(range(args.clients), key=sizes.__getitem__)
    clip, peft = model(cfg)
    opts = stage1_options(cfg, clip)
    start_state = peft.global_state()
    client, data, _ = client_inputs(cfg, clip, args.client, args.clients)
    split = client.train
    pixels = preprocess_images(clip.preprocess, split)
    encoder = clip.model.eval()

    @torch.no_grad()
    def encoded(idx):
        return encoder.encode_image(pixels[idx], normalize=True).float()

    @torch.no_grad()
    def preprocessed_and_encoded(idx):
        x = torch.stack([clip.preprocess(split.pil(int(i))) for i in idx]).float()
        return encoder.encode_image(x, normalize=True).float()

    diff = float((encoded(torch.arange(len(data))) - data.features).abs().max())
    sides = {
        "cached": lambda idx: data.features[idx],
        "encoder in the loop": encoded,
        "+ preprocess": preprocessed_and_encoded,
    }
    times = {name: [] for name in sides}
    for r in range(args.repeats + 1):
        for name, features_of in sides.items():
            peft.load_global_state(start_state)
            t = epoch(peft, data, cfg, opts, features_of)
            if r:  # the first round is a warm-up
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    steps = -(-len(data) // cfg.train.batch_size)
    print(
        f"config: peft.name={variant} model.name={cfg.model.name} data.name={cfg.data.name} client "
        f"{args.client} of {args.clients} ({len(data)} images, {steps} steps of batch {cfg.train.batch_size}), "
        f"method.name={cfg.method.name}, "
        f"threads {args.threads}, {args.repeats} interleaved repeats, medians"
    )
    print(
        f"  epoch: cached {1e3 * med['cached']:.1f} ms | encoder in the loop "
        f"{1e3 * med['encoder in the loop']:.1f} ms | encoder + preprocess in the loop "
        f"{1e3 * med['+ preprocess']:.1f} ms"
    )
    print(
        f"  speed-up of caching: {med['encoder in the loop'] / med['cached']:.2f}x over the encoder in the "
        f"loop, {med['+ preprocess'] / med['cached']:.2f}x over encoder + preprocess (target >= 10x); "
        f"max |recomputed - cached feature| {diff:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="prompt,adapter")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--client", type=int, default=-1, help="partition id (-1: the largest client)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--model", default=None, help="an open_clip architecture at its real size (random weights)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.variants.split(","):
        bench_variant(variant, args)


if __name__ == "__main__":
    main()
