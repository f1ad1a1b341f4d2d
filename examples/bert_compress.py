"""Compress a transformers BertModel: BTT and SPM at several ranks / stage counts.

For each setting: parameters of the replaced layers, relative error of the model output, and compiled
latency; a plot of error against parameters. The model is built from a config (random weights).

    python examples/bert_compress.py [--hidden 256] [--layers 4] [--out out/bert]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import structfx as sfx  # noqa: E402
from structfx.measure import median_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("out/bert"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                        intermediate_size=4 * args.hidden, vocab_size=1000, max_position_embeddings=128)
    model = BertModel(config).eval()
    ids = torch.randint(0, 1000, (8, 64))
    settings = {
        "dense (compiled as is)": [],
        **{f"BTT rank {r}": [sfx.BTT(rank=r)] for r in (1, 4, 16)},
        **{f"SPM {v}": [sfx.SPM(variant=v, fit_steps=args.fit_steps)] for v in ("orthogonal", "general")},
    }
    rows = []
    for name, rules in settings.items():
        small = sfx.transform(model, rules, example_inputs=(ids,)) if rules else model
        report = sfx.report(small) if rules else None
        start = time.perf_counter()
        compiled = sfx.compile(small, (ids,))
        build = time.perf_counter() - start
        params = sum(r.params_new for r in report.replaced) if report else _dense_params(model)
        error = report.model_error if report else 0.0
        ms = _latency_ms(compiled, ids)
        rows.append((name, params, error, ms, build))
        print(f"{name}: dense-layer params {params:,}, output error {error:.3f}, compiled {ms:.2f} ms "
              f"(built in {build:.1f} s)", flush=True)
    print("\n| setting | params of dense layers | model output rel. error | compiled ms | build s |")
    print("|---|---|---|---|---|")
    for name, params, error, ms, build in rows:
        print(f"| {name} | {params:,} | {error:.3f} | {ms:.2f} | {build:.1f} |")
    print(f"plot: {_plot(rows, args.out / 'bert_compress.png')}")


def _latency_ms(compiled, ids) -> float:
    return 1e3 * median_seconds(lambda: compiled(ids), warmup=2, repeat=5)


def _dense_params(model) -> int:
    return sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _plot(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, params, error, _, _ in rows:
        ax.scatter(params, error)
        ax.annotate(name, (params, error), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the dense layers")
    ax.set_ylabel("relative error of the model output")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
