"""``python -m fastdropout demo``: dropout against overfitting, and MC dropout's confidence.

Trains the same MLP, built from :mod:`fastdropout.nn`, on scikit-learn's handwritten digits
twice, without and with dropout, from the same initial weights and the same minibatch order;
prints the progress per epoch, the train and test accuracy of both, how dropout changed the
gap between them, and what Monte Carlo dropout says about the model's confidence.  Everything
is seeded, so two runs on one machine print the same numbers.

Needs scikit-learn (``pip install "fastdropout[demo]"``); its digits ship with it, so nothing
is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _api
from . import nn
from ._checks import output_path_arg, positive_int_arg
from ._generator import Generator

# The full demo: a wide hidden layer overfits a third of the digits without dropout.
TRAIN_SIZE = 600
HIDDEN = 1024
EPOCHS = 100
P_INPUT = 0.1
P_HIDDEN = 0.5
LR = 0.05
MOMENTUM = 0.9
BATCH = 32
MC_SAMPLES = 30
LOG_EVERY = 10

# --quick: the same program, small enough for the test suite.
QUICK = {"train_size": 200, "hidden": 128, "epochs": 3, "mc_samples": 5}


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastdropout demo",
        description="Train an MLP from fastdropout.nn on scikit-learn's digits without and with "
        "dropout; compare train/test accuracy and show MC dropout's confidence.",
    )
    parser.add_argument("--epochs", type=positive_int_arg, default=None, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--quick", action="store_true", help="a shortened run (small model, 3 epochs) for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation, order and masks")
    parser.add_argument(
        "--plot", metavar="PATH", type=output_path_arg,
        help="also draw the MC-dropout ensemble beside a random forest as each grows (1 to 100 members) to a PNG "
             "(needs matplotlib)")
    parser.add_argument(
        "--threads", type=positive_int_arg, default=1,
        help="kernel threads (default 1: the matrices are small; the numbers are the same for any count)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    return args


def _load_digits(seed: int, train_size: int) -> Tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:train_size], order[train_size:]
    return x[train], y[train], x[test], y[test]


def _build(hidden: int, p_input: float, p_hidden: float, seed: int) -> nn.Sequential:
    generator = Generator(seed)
    return nn.Sequential(
        nn.DropoutDense(64, hidden, p=p_input, activation="relu", generator=generator),
        nn.DropoutDense(hidden, 10, p=p_hidden, generator=generator),
    )


def _evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) with dropout off."""
    was_training = model.training
    logits = model.eval()(x)
    model.train(was_training)
    return float(np.mean(logits.argmax(axis=1) == y)), nn.cross_entropy(logits, y)[0]


def _train(model: nn.Sequential, data, epochs: int, seed: int, label: str) -> Dict[str, float]:
    x_train, y_train, x_test, y_test = data
    optimizer = nn.SGD(model, lr=LR, momentum=MOMENTUM)
    order_rng = np.random.default_rng(seed + 1)  # the same minibatch order for both runs
    live = sys.stdout.isatty()
    n_batches = max(1, len(x_train) // BATCH)
    model.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for idx in np.array_split(order_rng.permutation(len(x_train)), n_batches):
            loss, grad = nn.cross_entropy(model(x_train[idx]), y_train[idx])
            model.zero_grad()
            model.backward(grad)
            optimizer.step()
            total += loss
        train_acc, _ = _evaluate(model, x_train, y_train)
        test_acc, _ = _evaluate(model, x_test, y_test)
        line = (
            f"  {label} epoch {epoch:{len(str(epochs))}d}/{epochs}  loss {total / n_batches:.4f}  "
            f"train {100 * train_acc:5.1f}%  test {100 * test_acc:5.1f}%"
        )
        if epoch % LOG_EVERY == 0 or epoch in (1, epochs):
            print(("\r" if live else "") + line, flush=True)
        elif live:
            print("\r" + line, end="", flush=True)
    model.eval()
    train_acc, train_loss = _evaluate(model, x_train, y_train)
    test_acc, test_loss = _evaluate(model, x_test, y_test)
    return {"train": train_acc, "test": test_acc, "train_loss": train_loss, "test_loss": test_loss}


def _mc_confidence(model: nn.Module, x: np.ndarray, y: np.ndarray, samples: int) -> Dict[str, float]:
    """MC dropout: average the softmax over `samples` thinned networks, rank by predictive entropy."""
    mean, _ = nn.mc_predict(model, x, samples=samples, transform=nn.softmax)
    mean = mean.astype(np.float64)
    correct = mean.argmax(axis=1) == y
    entropy = -np.sum(mean * np.log(np.clip(mean, 1e-12, None)), axis=1)
    order = np.argsort(entropy, kind="stable")
    tenth = max(1, len(x) // 10)
    certain, uncertain = order[:tenth], order[-tenth:]
    return {
        "accuracy": float(correct.mean()),
        "n": tenth,
        "certain": float(correct[certain].mean()),
        "certain_entropy": float(entropy[certain].max()),
        "uncertain": float(correct[uncertain].mean()),
        "uncertain_entropy": float(entropy[uncertain].min()),
        "uncertain_errors": int((~correct[uncertain]).sum()),
        "errors": int((~correct).sum()),
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; ``argv`` as for ``python -m fastdropout demo`` (``--epochs N``, ``--quick``)."""
    args = _parse(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(
            "the demo needs scikit-learn for its handwritten digits: pip install \"fastdropout[demo]\"",
            file=sys.stderr,
        )
        return 1
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install \"fastdropout[bench]\"", file=sys.stderr)
            return 1
    train_size, hidden, epochs, samples = TRAIN_SIZE, HIDDEN, EPOCHS, MC_SAMPLES
    if args.quick:
        train_size, hidden, epochs, samples = (QUICK[k] for k in ("train_size", "hidden", "epochs", "mc_samples"))
    if args.epochs is not None:
        epochs = args.epochs
    seed = args.seed
    previous_threads = _api.get_num_threads()
    _api.set_num_threads(args.threads)
    try:
        model, data = _run(seed, train_size, hidden, epochs, samples)
        if args.plot:
            _plot_ensembles(model, data, seed, args.plot)
            print(f"\nwrote {args.plot}")
    finally:
        _api.set_num_threads(previous_threads)
    return 0


def _run(seed: int, train_size: int, hidden: int, epochs: int, samples: int):
    """Trains and reports; returns (the dropout model, the data)."""
    data = _load_digits(seed, train_size)
    n_train, n_test = len(data[0]), len(data[2])
    print("fastdropout demo: scikit-learn's handwritten digits (8x8 pixels, 10 classes)")
    print(f"  {n_train} training images, {n_test} test images; seed {seed}")
    print(
        f"  MLP 64 -> {hidden} (ReLU) -> 10 from fastdropout.nn, SGD lr {LR} momentum {MOMENTUM}, "
        f"batch {BATCH}, {epochs} epochs"
    )
    threads = _api.get_num_threads()
    print(f"  kernels: {_api.backend()} backend, {threads} thread{'s' if threads > 1 else ''}")

    runs = {}
    for name, p_input, p_hidden in (("plain", 0.0, 0.0), ("dropout", P_INPUT, P_HIDDEN)):
        what = "without dropout" if name == "plain" else f"with dropout (p = {p_input} on the pixels, {p_hidden} on the hidden layer)"
        print(f"\ntraining {what}")
        model = _build(hidden, p_input, p_hidden, seed)  # same seed: same initial weights
        runs[name] = (model, _train(model, data, epochs, seed, name))

    plain, drop = runs["plain"][1], runs["dropout"][1]
    print("\nresults (dropout off for evaluation)")
    print("                    train acc   test acc   gap        train loss   test loss")
    for label, r in (("without dropout", plain), ("with dropout", drop)):
        gap = 100 * (r["train"] - r["test"])
        print(
            f"  {label:16s}  {100 * r['train']:7.1f}%   {100 * r['test']:7.1f}%   {gap:4.1f} pts   "
            f"{r['train_loss']:10.4f}   {r['test_loss']:9.4f}"
        )
    gap_plain, gap_drop = 100 * (plain["train"] - plain["test"]), 100 * (drop["train"] - drop["test"])
    verb = "narrowed" if gap_drop < gap_plain else "did not narrow"
    print(f"  dropout {verb} the train-test accuracy gap: {gap_plain:.1f} -> {gap_drop:.1f} points")
    print(
        f"  test accuracy {100 * plain['test']:.1f}% -> {100 * drop['test']:.1f}%, "
        f"test loss {plain['test_loss']:.4f} -> {drop['test_loss']:.4f}"
    )

    mc = _mc_confidence(runs["dropout"][0], data[2], data[3], samples)
    print(f"\nMC dropout: {samples} passes with dropout on, softmax averaged, test images ranked by predictive entropy")
    print(f"  accuracy of the averaged prediction           {100 * mc['accuracy']:5.1f}%  ({mc['errors']} errors)")
    print(
        f"  most certain tenth  ({mc['n']} images, entropy <= {mc['certain_entropy']:.3f})  "
        f"{100 * mc['certain']:5.1f}%"
    )
    print(
        f"  least certain tenth ({mc['n']} images, entropy >= {mc['uncertain_entropy']:.3f})  "
        f"{100 * mc['uncertain']:5.1f}%  ({mc['uncertain_errors']} of the {mc['errors']} errors)"
    )
    return runs["dropout"][0], data


ENSEMBLE = 100  # members of both ensembles in the plot


def _entropy(prob: np.ndarray) -> np.ndarray:
    return -np.sum(prob * np.log(np.clip(prob, 1e-12, None)), axis=1)


def _growing(member_probs, y: np.ndarray):
    """Accuracy and mean predictive entropy of the average of the first k members, k = 1..n."""
    acc, ent, total = [], [], None
    for k, prob in enumerate(member_probs, start=1):
        total = prob.astype(np.float64) if total is None else total + prob
        mean = total / k
        acc.append(float(np.mean(mean.argmax(axis=1) == y)))
        ent.append(float(_entropy(mean).mean()))
    return np.array(acc), np.array(ent), mean


def _plot_ensembles(model: nn.Module, data, seed: int, path: str) -> None:
    """Dropout trains an implicit ensemble of thinned networks, in the spirit of a random forest:
    MC dropout samples its members, a forest grows its trees.  Both grow to ENSEMBLE members."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.ensemble import RandomForestClassifier

    x_train, y_train, x_test, y_test = data
    model.train()
    mc_members = (nn.softmax(model(x_test)) for _ in range(ENSEMBLE))  # each pass: a new thinned network
    mc_acc, mc_ent, mc_mean = _growing(mc_members, y_test)
    model.eval()
    forest = RandomForestClassifier(n_estimators=ENSEMBLE, random_state=seed, n_jobs=1).fit(x_train, y_train)
    rf_acc, rf_ent, rf_mean = _growing((t.predict_proba(x_test) for t in forest.estimators_), y_test)
    k = np.arange(1, ENSEMBLE + 1)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for acc, ent, label in ((mc_acc, mc_ent, "MC dropout (thinned networks)"), (rf_acc, rf_ent, "random forest (trees)")):
        axes[0].plot(k, 100 * acc, label=label)
        axes[1].plot(k, ent, label=label)
    axes[0].set(xscale="log", xlabel="ensemble members", ylabel="test accuracy (%)", title="accuracy as the ensemble grows")
    axes[1].set(xscale="log", xlabel="ensemble members", ylabel="mean predictive entropy (nats)",
                title="uncertainty as the ensemble grows")
    axes[0].legend()
    bins = np.linspace(0, np.log(10), 30)
    for mean, label, style in ((mc_mean, "MC dropout", "-"), (rf_mean, "random forest", "--")):
        right = mean.argmax(axis=1) == y_test
        ent = _entropy(mean)
        for sel, what in ((right, "right"), (~right, "wrong")):
            hist, _ = np.histogram(ent[sel], bins=bins, density=True)
            axes[2].step(bins[:-1], hist, where="post", linestyle=style, label=f"{label}: {what} ({sel.sum()})")
    axes[2].set(xlabel="predictive entropy of the 100-member average (nats)", ylabel="density",
                title="uncertainty of right and wrong answers")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"scikit-learn digits ({len(x_train)} train, {len(x_test)} test images), seed {seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
