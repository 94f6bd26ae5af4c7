"""EOT truncation: the prompt text encoder on sequences cut at max(EOT) + 1 vs the full context length.

Both paths run in this process on the same context vectors, interleaved
``--repeats`` times (medians): the truncated path is ``PromptPeft.text_features``
(what training uses); the full-length path is open_clip's own ``encode_text``
pipeline (token embedding, positional embedding, causal transformer, ln_final,
EOT pooling, projection) with the context vectors inserted, as in
tests/test_prompt.py. Timed forward only and forward + backward to the context
(a Stage-1 step's text-side work); prints the speed-ups and the largest absolute
difference of the text features.

    python bench/eot_truncation.py [--repeats 200] [--set key=value ...]
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
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import model, parse_sets, run_cfg  # noqa: E402

from fedpurel_app.data.client import classes  # noqa: E402


def full_length_features(clip, tokens, ctx):
    """open_clip's encode_text path at the full context length with ``ctx`` inserted."""
    model = clip.model
    n_ctx = ctx.shape[0]
    embedding = model.token_embedding(tokens)
    embedding = torch.cat(
        [embedding[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), embedding[:, 1 + n_ctx :]], dim=1
    )
    x = embedding + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = run_cfg({**parse_sets(args.set), "peft.name": "prompt"})
    clip, peft = model(cfg)
    classnames, _ = classes(cfg.data)
    n_ctx = cfg.peft.prompt.n_ctx
    tokens = clip.tokenizer([" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]).to(clip.device)
    ctx = peft.phi_g.ctx

    def short_fwd():
        with torch.no_grad():
            peft.text_features(peft.phi_g)

    def full_fwd():
        with torch.no_grad():
            full_length_features(clip, tokens, ctx)

    def short_step():
        torch.autograd.grad(peft.text_features(peft.phi_g).sum(), [ctx])

    def full_step():
        torch.autograd.grad(full_length_features(clip, tokens, ctx).sum(), [ctx])

    pairs = {"forward": (short_fwd, full_fwd), "forward + backward": (short_step, full_step)}
    times = {k: ([], []) for k in pairs}
    for r in range(args.repeats + 3):
        for k, (short, full) in pairs.items():
            ts, tf = timed(short), timed(full)
            if r >= 3:
                times[k][0].append(ts)
                times[k][1].append(tf)
    with torch.no_grad():
        diff = float((peft.text_features(peft.phi_g) - full_length_features(clip, tokens, ctx)).abs().max())
    length = peft.positional.shape[0]
    print(
        f"config: data.name={cfg.data.name} ({len(classnames)} classes), model.name={cfg.model.name}, "
        f"peft.prompt.n-ctx={n_ctx}, peft.prompt.ctx-init={cfg.peft.prompt.ctx_init!r}; "
        f"sequence length {length} (max EOT + 1) vs context length "
        f"{tokens.shape[1]}; threads 1, {args.repeats} interleaved repeats, medians"
    )
    for k, (ts, tf) in times.items():
        s, f = statistics.median(ts), statistics.median(tf)
        print(f"  {k:18s}: truncated {1e3 * s:.2f} ms | full length {1e3 * f:.2f} ms | speed-up {f / s:.2f}x")
    print(f"  max |text features truncated - full length| = {diff:.1e}")


if __name__ == "__main__":
    main()
