"""The long-range tasks of Hochreiter & Schmidhuber (1997) as Martens & Sutskever (2011)
used them, and the tanh RNN that learns them: data, initialization, forward pass, loss
and error (the problem half of ``recipes/rnn_pathological.py``).

Tasks (sequences of length T, time first; data generated on the fly, a fresh minibatch
per update, and a fixed test set of ``--test-size`` sequences):

* ``addition`` / ``multiplication``: 2 inputs (a value in [0, 1], a marker); two steps
  are marked, the first in the first 10% of the sequence, the second in the first half;
  the target at the last step is the sum (/2, scaled to [0, 1]) or the product of the
  marked values. Squared error; solved when < 1% of test sequences are off by > 0.04.
* ``xor``: as above with binary values; target their XOR (sigmoid output, cross-entropy);
  same criterion on the output probability.
* ``temporal_order`` (2 symbols, 4 classes) / ``temporal_order3`` (3 symbols, 8 classes):
  a stream of distractors {c, d, e, f}; X or Y appears at 2 (3) random times in fixed
  windows (2 symbols: [0.1T, 0.2T) and [0.4T, 0.5T)); the class at the end is the order
  of X/Y. Cross-entropy; solved at < 1% test classification error.
* ``random_permutation``: 100 symbols; the first symbol (1 or 2) is to be output at the
  end, the others are random distractors from 3..100. Solved at < 1% error.
* ``memorization``: 10 symbols of 2 bits each (4 classes) in the first 10 steps, then
  blanks, a trigger at step T−10, and the 10 symbols to be output in the last 10 steps.
  Solved when < 1% of test sequences have any output wrong.

Initialization (Martens & Sutskever 2011): every unit gets 15 nonzero incoming weights
drawn from N(0, 1) (all of them when there are fewer inputs), biases 0, and the recurrent
matrix is rescaled to spectral radius 1.1; ``--input-scale`` shrinks the input weights
(0.1 is what lets the one-hot temporal-order streams through, see ``sparse_init_rnn``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import torch_hf

TASKS = ("addition", "multiplication", "xor", "temporal_order", "temporal_order3", "random_permutation",
         "memorization")
# Input-weight scale of the initialization, for every task. At the paper's N(0, 1) input
# weights the last state's sensitivity to an input 95 steps back is 1e-10 (addition, XOR),
# 1e-14..1e-18 (temporal order, memorization) or 1e-4 (random permutation) at T = 100;
# scaled by 0.1 it is ~0.1..4 on most seeds (docs/rnns.md has the table).
DEFAULT_INPUT_SCALE = 0.1
# Where X/Y may appear, as fractions of T: Hochreiter & Schmidhuber's task 6a/6b windows
# (t1 in [10, 20], t2 in [50, 60] of ~100 steps for 2 symbols; [10, 20], [33, 43], [66, 76]
# for 3) scaled to any T, with the second 2-symbol window at [0.4T, 0.5T) as in the
# versions of the task used with HF.
ORDER_WINDOWS = {2: ((0.1, 0.2), (0.4, 0.5)), 3: ((0.1, 0.2), (0.33, 0.43), (0.66, 0.76))}


@dataclass
class Batch:
    x: torch.Tensor  # T × B × inputs
    y: torch.Tensor  # targets: B (classes), B × 1 (regression), or B × 10 (memorization)


@dataclass
class TaskSpec:
    inputs: int
    outputs: int
    kind: str  # "regression", "binary", "classes", "memorization"


def spec(task: str) -> TaskSpec:
    return {
        "addition": TaskSpec(2, 1, "regression"),
        "multiplication": TaskSpec(2, 1, "regression"),
        "xor": TaskSpec(2, 1, "binary"),
        "temporal_order": TaskSpec(6, 4, "classes"),
        "temporal_order3": TaskSpec(6, 8, "classes"),
        "random_permutation": TaskSpec(100, 100, "classes"),
        "memorization": TaskSpec(6, 4, "memorization"),
    }[task]


def generate(task: str, T: int, n: int, gen: torch.Generator) -> Batch:
    """``n`` sequences of length ``T`` of ``task`` (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if T < 12:
        raise ValueError(f"T must be at least 12, got {T}")
    rows = torch.arange(n)
    if task in ("addition", "multiplication", "xor"):
        if task == "xor":
            values = torch.randint(0, 2, (T, n), generator=gen).float()
        else:
            values = torch.rand(T, n, generator=gen)
        first = torch.randint(0, max(1, T // 10), (n,), generator=gen)
        second = torch.randint(max(1, T // 10), max(T // 10 + 1, T // 2), (n,), generator=gen)
        marks = torch.zeros(T, n)
        marks[first, rows] = 1.0
        marks[second, rows] = 1.0
        a, b = values[first, rows], values[second, rows]
        target = {"addition": (a + b) / 2, "multiplication": a * b, "xor": (a != b).float()}[task]
        return Batch(torch.stack([values, marks], dim=2), target[:, None])
    if task in ("temporal_order", "temporal_order3"):
        k = 2 if task == "temporal_order" else 3
        symbols = torch.randint(2, 6, (T, n), generator=gen)  # distractors c, d, e, f
        bits = torch.randint(0, 2, (k, n), generator=gen)
        for j, (lo, hi) in enumerate(ORDER_WINDOWS[k]):
            lo, hi = int(lo * T), int(hi * T)
            pos = torch.randint(lo, max(hi, lo + 1), (n,), generator=gen)
            symbols[pos, rows] = bits[j]  # 0 = X, 1 = Y
        label = sum(bits[j] << (k - 1 - j) for j in range(k))
        return Batch(F.one_hot(symbols, 6).float(), label)
    if task == "random_permutation":
        symbols = torch.randint(2, 100, (T, n), generator=gen)
        first = torch.randint(0, 2, (n,), generator=gen)
        symbols[0] = first
        return Batch(F.one_hot(symbols, 100).float(), first)
    # memorization: 10 two-bit symbols, blanks (4), trigger (5), outputs in the last 10 steps
    symbols = torch.full((T, n), 4, dtype=torch.long)
    pattern = torch.randint(0, 4, (10, n), generator=gen)
    symbols[:10] = pattern
    symbols[T - 11] = 5
    return Batch(F.one_hot(symbols, 6).float(), pattern.T.contiguous())


def sparse_init_rnn(inputs: int, hidden: int, outputs: int, gen: torch.Generator,
                    nonzero: int = 15, radius: float = 1.1, input_scale: float = 1.0) -> torch.nn.ModuleDict:
    """The tanh RNN of Martens & Sutskever (2011) with their sparse initialization.

    ``input_scale`` multiplies the input-to-hidden weights. At 1 (the paper's N(0, 1)) a
    one-hot input stream such as temporal order's distractors drives every unit with unit
    variance noise at every step, saturating the tanh units so far that the sensitivity
    of the last state to the input 85 steps earlier is ~1e-13 (T=100); at 0.1 it is ~0.4
    (``tests/test_recipes.py`` checks both)."""
    if not input_scale > 0:
        raise ValueError(f"input_scale must be positive, got {input_scale}")

    def sparse(rows: int, cols: int) -> torch.Tensor:
        w = torch.zeros(rows, cols)
        for r in range(rows):
            idx = torch.randperm(cols, generator=gen)[: min(nonzero, cols)]
            w[r, idx] = torch.randn(len(idx), generator=gen)
        return w

    model = torch.nn.ModuleDict({"inp": torch.nn.Linear(inputs, hidden), "rec": torch.nn.Linear(hidden, hidden,
                                 bias=False), "out": torch.nn.Linear(hidden, outputs)})
    with torch.no_grad():
        model["inp"].weight.copy_(sparse(hidden, inputs) * input_scale)
        rec = sparse(hidden, hidden)
        rec *= radius / torch.linalg.eigvals(rec).abs().max()
        model["rec"].weight.copy_(rec)
        model["out"].weight.copy_(sparse(outputs, hidden))
        for layer in (model["inp"], model["out"]):
            layer.bias.zero_()
    return model


def forward(model: torch.nn.ModuleDict, x: torch.Tensor, checkpoint=None, readout: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """All hidden states (T × B × H) and the readout of the last ``readout`` steps (all
    steps when None): the tasks only score the last step (memorization the last 10), so
    the others need no output layer."""
    h0 = torch.zeros(x.shape[1], model["rec"].weight.shape[0], dtype=x.dtype, device=x.device)
    pre = model["inp"](x)  # the input projection of all steps at once

    def cell(p_t, h):
        return torch.tanh(p_t + model["rec"](h))

    states = torch_hf.nn.unroll(cell, pre, h0, checkpoint=checkpoint)
    return states, model["out"](states if readout is None else states[-readout:])


def readout_steps(kind: str) -> int:
    return 10 if kind == "memorization" else 1


def task_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the outputs it reads): only the steps that carry a target are outputs."""
    if kind == "memorization":
        z = out[-10:].transpose(0, 1)  # B × 10 × classes
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)), z
    z = out[-1]
    if kind == "regression":
        return F.mse_loss(z, y), z
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(z, y), z
    return F.cross_entropy(z, y), z


def task_error(kind: str, z: torch.Tensor, y: torch.Tensor) -> float:
    """The success metric: fraction of sequences the network gets wrong."""
    if kind == "regression":
        return float(((z - y).abs() > 0.04).float().mean())
    if kind == "binary":
        return float(((torch.sigmoid(z) - y).abs() > 0.04).float().mean())
    if kind == "memorization":
        return float((z.argmax(-1) != y).any(dim=1).float().mean())
    return float((z.argmax(-1) != y).float().mean())
