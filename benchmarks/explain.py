"""What explanations cost, measured side by side in one run: the plain forward pass (the
normal path, attention recording off), the forward pass recording every MOAT block's
attention, and a whole `Explainer.explain` (prediction, attention maps, HiResCAM for all
five stages), per image, median of the repeats, interleaved.

    python benchmarks/explain.py [--model tiny_moat_0] [--img-size 224] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/inference.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from matplotlib import cbook  # noqa: E402
from PIL import Image  # noqa: E402

import moat  # noqa: E402
from moat.cpu import cpu_info  # noqa: E402
from moat.data.transforms import eval_transform  # noqa: E402
from moat.explain import Explainer, record_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_moat_0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = moat.create_model(args.model).eval()
    explainer = Explainer(model, transform=eval_transform(args.img_size))
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = explainer.transform(photo)[None]

    def plain():
        with torch.no_grad():
            model(x)

    def recording():
        with torch.no_grad(), record_attention(model):
            model(x)

    cases = {"forward (recording off)": plain, "forward recording attention": recording,
             "Explainer.explain (maps + HiResCAM x5)": lambda: explainer.explain(photo)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for run in cases.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"{args.model}, {args.img_size}x{args.img_size}, batch 1, CPU {cpu_info().describe()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of "
          f"{args.repeats}")
    print(f"{'case':42s} {'ms':>8s}")
    for name, values in times.items():
        print(f"{name:42s} {statistics.median(values) * 1000:8.1f}")


if __name__ == "__main__":
    main()
