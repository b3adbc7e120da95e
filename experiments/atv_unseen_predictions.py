"""What the fast ATV answers on an unseen task: the first tokens it predicts, per target.

    python experiments/atv_unseen_predictions.py --seed 1 [--tasks number_sign,sentiment]
        [--n 60] [--out predictions.json]

Trains the generator exactly as the ``atv`` finding of ``tvlens reproduce --profile full``
does for that seed (``recipe_config("fast", seed=...)``, the ATV training suite, the
recipe's own step count) and decodes each task's ``n`` evaluation items (the finding's
items: ``evaluate(..., seed=seed)``) with it. Prints each task's accuracy and the commonest
(target, predicted first token) pairs, so a low unseen score can be read as what it is:
a wrong label of the training suite (the generator routed the query to another training
task), a right label in the wrong format, or noise. About 15 min on one CPU core for
SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import tvlens
from tvlens import evaluate, load_task
from tvlens.adaptive import make_generator, train_generator
from tvlens.adaptive.config import recipe_config
from tvlens.tasks.builtin import ATV_TRAIN_SUITE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="number_sign,sentiment")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()

    model = tvlens.load_model(args.model, device="cpu", progress=False)
    cfg = recipe_config("fast", seed=args.seed)
    gen = make_generator(model, args.model, config=cfg)
    start = time.perf_counter()
    history = train_generator(model, gen, [load_task(t) for t in ATV_TRAIN_SUITE], config=cfg,
                              progress=False)
    print(f"generator: {history.get('steps')} steps, {time.perf_counter() - start:.0f} s")
    out = {}
    for name in args.tasks.split(","):
        r = evaluate(model, load_task(name), vector=gen, n=args.n, template=gen.template,
                     seed=args.seed, progress=False)
        pairs = Counter(zip(r.records["target"].astype(str), r.records["prediction"].astype(str)))
        out[name] = {"accuracy": r.accuracy, "n": r.n,
                     "pairs": [{"target": t, "prediction": pr, "count": c}
                               for (t, pr), c in pairs.most_common()]}
        print(f"{name}: accuracy {r.accuracy:.3f} (n={r.n})")
        for (t, pr), c in pairs.most_common(8):
            print(f"  target {t!r:>12}  predicted {pr!r:>12}  × {c}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seed": args.seed, "model": args.model, "tasks": out}, f, indent=1)


if __name__ == "__main__":
    main()
