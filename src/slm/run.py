"""`slm run demo|tinystories`: the stages chained, prepare -> train -> generate, with nothing of their own."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from slm.config import resolve

# Each pipeline: the corpus to prepare, the preset to train, and overrides of that preset.
PIPELINES = {
    # Offline on 2 CPU cores: about 30 s of preparing, 6 minutes of training, a few stories.
    "demo": {"source": "demo", "preset": "cpu", "train": {"max_minutes": 6.0, "eval_interval": 200}},
    # The real corpus from the hub; sized for one GPU (see the README for the expected time).
    "tinystories": {"source": "tinystories", "preset": "seed", "train": {}},
}
PROMPTS = ("Once upon a time", "One day, a little", "Tom and his dog")


def main(args) -> int:
    from slm import prepare, train
    from slm.checkpoint import checkpoint_dir, load_model
    from slm.generate import sample_text
    from slm.tokenizer import get_tokenizer

    pipeline = PIPELINES[args.pipeline]
    data_dir = Path(args.data_out or f"data/{args.pipeline}")
    run_dir = Path(args.out or f"runs/{args.pipeline}")
    started = time.perf_counter()

    if (data_dir / "meta.json").is_file() and not args.force:
        print(f"using the prepared data in {data_dir} (--force prepares it again)", file=sys.stderr)
    else:
        prepare.prepare(pipeline["source"], data_dir, force=True)

    overrides = {"data": str(data_dir), **pipeline["train"]}
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    cfg = resolve(pipeline["preset"], flags={"train": overrides})
    train.start(cfg, run_dir, force=args.force)

    model, cfg, _ = load_model(checkpoint_dir(run_dir, "best"))
    tokenizer = get_tokenizer()
    for i, prompt in enumerate(PROMPTS):
        story = sample_text(model, tokenizer, prompt, max_new_tokens=cfg.model.block_size * 2, temperature=0.8,
                            top_k=40, seed=i)
        print(f"\n--- story {i + 1} ---\n{story.strip()}")
    print(f"\n{args.pipeline}: done in {(time.perf_counter() - started) / 60:.1f} min; the model is in {run_dir} "
          f"(try `slm generate {run_dir} --prompt \"Once upon a time\"`)", file=sys.stderr)
    return 0
