"""Where one SmolLM2-135M train step spends its time, by op class, in JAX and in torch.

Run from the repository root, the examples' package on the path:
PYTHONPATH=examples python benchmarks/profile_step.py ...

    python benchmarks/profile_step.py lorax --targets qv     # XLA:CPU trace of the compiled step
    python benchmarks/profile_step.py peft --targets qv      # torch.profiler of PEFT's step
    python benchmarks/profile_step.py jax-full               # (and torch-full)

The step is `smollm_step.py`'s, same batch and options. JAX: the XLA:CPU profiler's thunk
events, each tied to its HLO instruction, classed by the instruction's op name (lorax keeps the
model's layer names on what it emits) and shape. XLA:CPU runs independent instructions side by
side, so each instant of the trace is shared equally among the instructions running then
(`wall_ms`): the classes add up to the step's busy wall time, not to its thread time, which
counts overlapping instructions twice. torch: the profiler's self time per aten op, classed by
op and shapes (torch runs one op at a time, each on all cores). Prints a table (ms per step by
class) and one JSON line.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import re
import sys
import tempfile

import smollm_step

CLASSES = ("projections", "low-rank factors", "attention", "RoPE", "norms", "SiLU and gating", "head",
           "loss", "optimizer", "scan: per-layer weight slices", "scan: residual buffers", "copies and transposes",
           "other")
WEIGHT_DIMS = {576, 192, 1536}  # SmolLM2's projection widths: a slice of exactly these is a layer's weight


# ----------------------------------------------------------------------------- JAX


def _hlo_index(hlo: str) -> dict:
    """Instruction name -> (opcode, op_name metadata, the instruction's text)."""
    index = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            index[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "", line)
    return index


def dot_flops(hlo: str) -> dict:
    """Instruction name -> the flops of one run of it: a ``dot``'s (2 × its output's elements ×
    the contracted size), or a fusion's, the sum of the dots in the computation it calls."""
    shapes, dots, members, calls, computation = {}, {}, collections.defaultdict(list), {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            computation = header.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)", line)
        if not m:
            continue
        name, dims, opcode, operands = m.group(1), [int(d) for d in m.group(2).split(",") if d], m.group(3), m.group(4)
        shapes[name] = dims
        members[computation].append(name)
        if opcode == "dot":
            lhs = shapes[operands.split(",")[0].strip().lstrip("%")]
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
            dots[name] = 2 * math.prod(dims) * size
        elif called := re.search(r"calls=%?([\w.\-]+)", line):
            calls[name] = called.group(1)
    fused = {name: sum(dots.get(n, 0) for n in members[body]) for name, body in calls.items()}
    return {**{name: f for name, f in fused.items() if f}, **dots}


def jax_class(opcode: str, op_name: str, text: str, rank: int) -> str:
    """The op class of one compiled HLO instruction."""
    shapes = re.findall(r"\[([\d,]*)\]", text.split(" calls=")[0])
    dims = {int(d) for s in shapes for d in s.split(",") if d}
    if "jvp(" not in op_name:
        return "optimizer" if op_name else "scan: residual buffers"  # zero-filled stacks carry no op name
    if re.search(r"dynamic[_-](update[_-])?slice|dynamic_index|while/body/jit\(", op_name) or opcode == "broadcast":
        out = re.match(r"\s*\S+ = \w+\[([\d,]*)\]", text)
        out_dims = {int(d) for d in out.group(1).split(",") if d} if out else set()
        weight = "dynamic_slice" in op_name and out_dims and out_dims <= WEIGHT_DIMS | {rank}
        return "scan: per-layer weight slices" if weight else "scan: residual buffers"
    if "_proj/" in op_name:
        return "low-rank factors" if rank in dims else "projections"
    if "embed_tokens.attend" in op_name or "fused_xent" in op_name:  # the tied head; fused: with its loss
        return "head"
    if "/rope/" in op_name:
        return "RoPE"
    if "layernorm" in op_name or "/norm/" in op_name:
        return "norms"
    if "/mlp/" in op_name:
        return "SiLU and gating"
    if "self_attn" in op_name:
        return "attention"
    if "Llama" not in op_name:
        return "loss"
    if "transpose" in opcode or "copy" in opcode or "copy" in text.split("=")[0]:
        return "copies and transposes"
    return "other"


def profile_jax(run, compiled, steps: int, rank: int, top: int = 0) -> dict:
    import jax
    from jax.profiler import ProfileData

    hlo = compiled.as_text()
    index = _hlo_index(hlo)
    with tempfile.TemporaryDirectory() as trace:
        jax.profiler.start_trace(trace)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        data = ProfileData.from_file(sorted(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True))[-1])
    events = []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is None or op not in index or index[op][0] in ("while", "call", "conditional"):
                    continue  # containers: their bodies' events are counted themselves
                events.append((event.start_ns, event.start_ns + event.duration_ns, op))
    by_op = wall_ms(events, steps)
    thread_ms = sum(end - start for start, end, _ in events) / 1e6 / steps
    print(f"  {sum(by_op.values()):.0f} ms busy per step, {thread_ms:.0f} ms of thread time")
    if top:  # GFLOP/s: a product's flops over its share of the wall time
        runs, flops = collections.Counter(op for *_, op in events), dot_flops(hlo)
        for op, t in by_op.most_common(top):
            rate = f"{flops[op] * runs[op] / steps / t / 1e6:6.0f} GFLOP/s" if op in flops and t else " " * 14
            print(f"  {t:8.1f} ms {rate}  {jax_class(*index[op], rank):30s} {index[op][2].strip()[:160]}")
    ms = collections.Counter()
    for op, t in by_op.items():
        ms[jax_class(*index[op], rank)] += t
    return ms


def wall_ms(events, steps: int = 1) -> collections.Counter:
    """Milliseconds per step of each key, from ``(start_ns, end_ns, key)`` events that may overlap:
    each instant is shared equally among the events running then, so the keys add up to the time
    at least one event ran.

    >>> wall_ms([(0, 10_000_000, "a"), (5_000_000, 15_000_000, "b")])
    Counter({'a': 7.5, 'b': 7.5})
    """
    edges = sorted({t for start, end, _ in events for t in (start, end)})
    starting, ending = collections.defaultdict(list), collections.defaultdict(list)
    for i, (start, end, _) in enumerate(events):
        starting[start].append(i)
        ending[end].append(i)
    ms, running = collections.Counter(), set()
    for previous, now in zip(edges, edges[1:]):
        running.update(starting[previous])
        running.difference_update(ending[previous])  # after: an event of no length never runs
        for i in running:
            ms[events[i][2]] += (now - previous) / len(running) / 1e6 / steps
    return ms


# ----------------------------------------------------------------------------- torch

_TORCH_OPS = {
    "attention": ("bmm", "baddbmm", "softmax", "_softmax", "scaled_dot_product", "masked_fill"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy"),
    "optimizer": ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt"),
    "SiLU and gating": ("silu",),
    "copies and transposes": ("copy_", "clone", "contiguous", "t", "transpose", "permute", "view", "reshape",
                              "_unsafe_view", "as_strided", "detach", "empty", "zeros", "ones", "fill_", "zero_"),
}


def torch_class(name: str, shapes: list, rank: int, vocab: int, hidden: int = 1536, head_dim: int = 64) -> str:
    """The op class of one aten op, from its name and input shapes (SmolLM2's sizes)."""
    op = name.removeprefix("aten::")
    dims = {d for s in shapes for d in (s or [])}
    last = {s[-1] for s in shapes if s}
    if op in ("mm", "addmm", "matmul", "linear"):
        return "head" if vocab in dims else "low-rank factors" if rank in dims else "projections"
    for cls, ops in _TORCH_OPS.items():
        if any(op == o or (len(o) > 3 and o in op) for o in ops):  # short names (t, view) match exactly
            return cls
    if last & {head_dim, head_dim // 2} or op in ("neg", "cos", "sin"):
        return "RoPE"
    if op in ("pow", "mean", "rsqrt") or 1 in last or any(len(s) == 1 and s[0] != rank for s in shapes if s):
        return "norms"
    if hidden in last and op == "mul":
        return "SiLU and gating"
    return "other"  # residual adds, the loss's glue, the autograd engine's accumulations


def profile_torch(run, steps: int, rank: int, vocab: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            run()
    ms = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        ms[torch_class(event.key, event.input_shapes, rank, vocab)] += event.self_cpu_time_total / 1e3 / steps
    return ms


def main(argv=None):
    p = smollm_step.parser(__doc__.splitlines()[0])
    p.add_argument("--profiled", type=int, default=2, help="steps traced")
    p.add_argument("--top", type=int, default=0,
                   help="JAX: also print the N costliest HLO instructions, with each product's GFLOP/s")
    args = smollm_step.parsed(p, argv)
    run, _, _, _, compiled, _ = smollm_step.step_of(args)
    for _ in range(args.warmup):
        run()
    ms = profile_jax(run, compiled, args.profiled, args.rank, args.top) if compiled else \
        profile_torch(run, args.profiled, args.rank, 49152)
    total = sum(ms.values())
    print(f"{args.framework} {args.targets}: ms per step by op class (wall time, sum {total:.0f} ms)")
    for cls in CLASSES:
        if ms.get(cls):
            print(f"  {cls:34s} {ms[cls]:9.1f}  {ms[cls] / total:6.1%}")
    print(json.dumps(dict(framework=args.framework, targets=args.targets, ms_per_step=dict(ms))))


if __name__ == "__main__":
    sys.exit(main())
