"""The README's main job on built-in data: scikit-learn's digits, dense vs structured layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import structfx as sfx
from structfx.measure import median_seconds
from structfx.nn import BTTLinear, SparseMaxPlus, SPMLinear

#: Hidden width. 1024, not the 256 a digits MLP needs: at 256 the whole dense model is ~0.5 ms of
#: eager PyTorch, too little work for a structured, compiled model to win on latency (issue 12).
HIDDEN = 1024


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int = 0) -> Digits:
    """load_digits (1797 8x8 images) standardised, 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return Digits(as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test))


def build_models() -> dict[str, nn.Module]:
    """The four classifiers: a dense ReLU MLP, the max-plus paper's block, and BTT / SPM hidden layers."""
    def mlp(hidden: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), hidden, nn.ReLU(), nn.Linear(HIDDEN, 10))

    return {
        "dense (ReLU)": mlp(nn.Linear(HIDDEN, HIDDEN)),
        "max-plus k=2": nn.Sequential(
            nn.Linear(64, HIDDEN, bias=False), nn.BatchNorm1d(HIDDEN), SparseMaxPlus(HIDDEN, HIDDEN, k=2),
            nn.Linear(HIDDEN, 10),
        ),
        "BTT rank 1": mlp(BTTLinear(HIDDEN, HIDDEN, rank=1)),
        "SPM orthogonal": mlp(SPMLinear(HIDDEN, HIDDEN)),
    }


def train(model: nn.Module, data: Digits, epochs: int, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Adam on minibatches of 64; returns the mean training loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        total = 0.0
        for batch in order.split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(data.x_train))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def eager_latency_ms(model: nn.Module, batch: int = 256) -> float:
    x = torch.randn(batch, 64)
    return 1e3 * median_seconds(lambda: model(x))


def measure(model: nn.Module, data: Digits) -> dict[str, float]:
    return {
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "parameters": count_parameters(model),
        "latency_ms": eager_latency_ms(model),
    }


def compress(dense: nn.Module, data: Digits, epochs: int, console: Console) -> tuple[nn.Module, nn.Module]:
    """structfx.transform on the trained dense model (BTT for the dense layers, max-plus for the ReLUs),
    calibrated on training inputs; returns it as converted and after fine-tuning."""
    calibration = list(data.x_train.split(256))
    converted = sfx.transform(dense, [sfx.BTT(rank=4), sfx.MaxPlus(k=2)], example_inputs=(data.x_test[:8],),
                              calibration=calibration)
    console.print(Markdown(sfx.report(converted).to_markdown()))
    tuned = copy.deepcopy(converted)
    train(tuned, data, epochs, lr=1e-3)
    return converted, tuned


def deploy(model: nn.Module, data: Digits, directory: Path):
    """Compile for this CPU, save the artifact, and load it back with the TVM runtime alone."""
    from structfx.runtime import load

    compiled = sfx.compile(model, data.x_test[:8])
    artifact = compiled.save(directory, overwrite=True)
    return artifact, load(artifact)


def run(out_dir: Path, epochs: int = 30, console: Console | None = None) -> dict[str, dict[str, float]]:
    """Train every model, transform the dense one and fine-tune it, print one table, write a plot."""
    console = console or Console()
    torch.manual_seed(0)
    data = load_data()
    rows = {}
    models = build_models()
    for name, model in models.items():
        train(model, data, epochs)
        rows[name] = measure(model, data)
    converted, tuned = compress(models["dense (ReLU)"], data, max(1, epochs // 3), console)
    rows["dense -> transform(BTT r=4, MaxPlus)"] = measure(converted, data)
    rows["  ... fine-tuned"] = measure(tuned, data)
    artifact, deployed = deploy(tuned, data, out_dir / "digits.sfx")
    batch = torch.randn(256, 64).numpy()
    rows["  ... compiled, saved, reloaded (TVM runtime)"] = {
        "accuracy": float((deployed(data.x_test.numpy()).argmax(1) == data.y_test.numpy()).mean()),
        "parameters": count_parameters(tuned),
        "latency_ms": 1e3 * median_seconds(lambda: deployed(batch)),
    }
    threads = torch.get_num_threads()
    table = Table(title=f"digits: test accuracy, parameters, latency (batch 256, {threads} threads; "
                        f"hidden layers widened to {HIDDEN} so the compiled structured model has work to win on)")
    for column in ("model", "accuracy", "parameters", "latency ms"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['accuracy']:.3f}", f"{row['parameters']:,}", f"{row['latency_ms']:.3f}")
    console.print(table)
    plot_path = plot(rows, out_dir / "demo.png")
    console.print(f"plot: {plot_path}\nartifact: {artifact} (run it: structfx run {artifact} --input x.npy)")
    return rows


def plot(rows: dict[str, dict[str, float]], path: Path) -> Path:
    """Accuracy, parameters and latency per model, as bars (one row per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [name.strip(" .") for name in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, key, label in zip(axes, ("accuracy", "parameters", "latency_ms"),
                              ("test accuracy", "parameters", "latency ms (batch 256)")):
        ax.barh(names, [row[key] for row in rows.values()])
        ax.set_xlabel(label)
    axes[0].set_xlim(0.9, 1.0)
    axes[0].invert_yaxis()
    fig.suptitle("digits: dense vs structured layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
