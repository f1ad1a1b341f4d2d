"""Digits, end to end: train -> transform -> fine-tune -> compile -> save -> load with the TVM runtime.

Prints the accuracy and latency of every stage in one table and writes a plot.

    python examples/digits_end_to_end.py [--epochs 30] [--out out/digits]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import structfx as sfx  # noqa: E402
from structfx.demo import accuracy, load_data, train  # noqa: E402
from structfx.measure import median_seconds  # noqa: E402
from structfx.runtime import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("out/digits"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data()
    batch = torch.randn(256, 64)
    stages = {}

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    train(model, data, args.epochs)
    stages["trained (dense)"] = (accuracy(model, data.x_test, data.y_test), _latency(model, batch))

    small = sfx.transform(model, [sfx.BTT(rank=2), sfx.MaxPlus(k=2)], example_inputs=(data.x_test[:8],),
                          calibration=list(data.x_train.split(256)))
    print(sfx.report(small).to_markdown())
    stages["transformed"] = (accuracy(small, data.x_test, data.y_test), _latency(small, batch))

    train(small, data, max(1, args.epochs // 3), lr=1e-3)
    stages["fine-tuned"] = (accuracy(small, data.x_test, data.y_test), _latency(small, batch))

    compiled = sfx.compile(small, data.x_test[:8])
    stages["compiled (TVM)"] = (accuracy(compiled, data.x_test, data.y_test), _latency(compiled, batch))

    runtime = load(compiled.save(args.out / "digits.sfx", overwrite=True))
    numpy_batch = batch.numpy()
    correct = (runtime(data.x_test.numpy()).argmax(1) == data.y_test.numpy()).mean()
    stages["saved + loaded (runtime)"] = (float(correct), 1e3 * median_seconds(lambda: runtime(numpy_batch)))

    print("\n| stage | test accuracy | latency ms (batch 256) |\n|---|---|---|")
    for name, (acc, ms) in stages.items():
        print(f"| {name} | {acc:.3f} | {ms:.3f} |")
    print(f"plot: {_plot(stages, args.out / 'digits_end_to_end.png')}")


@torch.no_grad()
def _latency(model, batch) -> float:
    return 1e3 * median_seconds(lambda: model(batch))


def _plot(stages: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(stages)
    left.barh(names, [acc for acc, _ in stages.values()])
    left.set_xlabel("test accuracy")
    left.set_xlim(0.8, 1.0)
    right.barh(names, [ms for _, ms in stages.values()])
    right.set_xlabel("latency ms (batch 256)")
    right.set_yticks(range(len(names)), [""] * len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
