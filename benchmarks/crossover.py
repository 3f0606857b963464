"""Where ``backend="auto"`` should compile: the compiled path against the generic one, measured
(``make bench`` runs it).

One training step (forward, sum of the outputs, backward) of an ``ImplicitResNet`` of
``LAYERS`` tanh layers (``h = 0.5``, ``theta = 0.5``, tol 1e-6), on both paths with the same
weights, over widths, per-member batches, member counts and dtypes (widths measured up to the first one where the
compiled step takes ``STOP_RATIO`` times the generic one); steps interleaved one by one
(:func:`bench.interleaved_times`), the median kept. Writes

- ``irn/auto_crossover.json``: per dtype, member count and batch, the largest width up to
  which every measured width ran faster compiled, the table ``irn.compiled.compiled_widest``
  reads (``auto``'s rule, committed beside it);
- ``benchmarks/results_crossover.md``: every ratio, with the machine and the command.

    python benchmarks/crossover.py [--min-time 0.3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import irn

sys.path.insert(0, str(Path(__file__).parent))
from bench import _cpu_name, interleaved_times, median, wait_for_quiet  # noqa: E402

WIDTHS = (2, 4, 8, 16, 32, 64, 128)
BATCHES = (16, 64, 256, 1024)
MEMBERS = (1, 16)
DTYPES = (torch.float32, torch.float64)
LAYERS = 5
STOP_RATIO = 1.5  # a width this much slower compiled ends its row (the cost grows with width)
TABLE = Path(irn.__file__).with_name("auto_crossover.json")


def steps(width: int, batch: int, members: int, dtype: torch.dtype) -> dict:
    """One training step on each path, ``{"compiled": step, "torch": step}``."""
    torch.manual_seed(0)
    nets = [irn.ImplicitResNet(width, LAYERS, h=0.5, theta=0.5, activation="tanh",
                               init="random", tol=1e-6, on_nonconvergence="ignore").to(dtype)
            for _ in range(members)]
    net = nets[0] if members == 1 else irn.ImplicitResNet.stack(nets)
    shape = (batch, width) if members == 1 else (members, batch, width)
    x = torch.randn(*shape, dtype=dtype)
    paths = {"compiled": net.with_settings(backend="compiled"),
             "torch": net.with_settings(backend="torch")}

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return run
    return {name: step(model) for name, model in paths.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per step and point")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = wait_for_quiet()
    largest, rows = {}, []
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for members in MEMBERS:
            for batch in BATCHES:
                for width in WIDTHS:
                    samples = interleaved_times(steps(width, batch, members, dtype),
                                                args.min_time, 5)
                    ratio = median(samples["compiled"]) / median(samples["torch"])
                    rows.append((name, members, batch, width, median(samples["torch"]), ratio))
                    print(f"{name} E={members:<3} B={batch:<5} d={width:<4} "
                          f"torch {1e3 * rows[-1][4]:8.2f} ms  compiled/torch {ratio:.2f}",
                          flush=True)
                    if ratio >= STOP_RATIO:  # wider ones only grow slower compiled
                        break
                widest = 0  # the largest width up to which compiled won at every width
                for width, faster in zip(WIDTHS, [r[5] < 1 for r in rows
                                                  if r[:3] == (name, members, batch)]):
                    if not faster:
                        break
                    widest = width
                largest.setdefault(name, {}).setdefault(str(members), {})[str(batch)] = widest
    command = " ".join(["python"] + sys.argv)
    machine = f"{os.cpu_count()} cores ({_cpu_name()}), torch {torch.__version__}, " \
              f"{args.threads} thread(s)"
    TABLE.write_text(json.dumps({"command": command, "machine": machine, "layers": LAYERS,
                                 "largest_width": largest}, indent=1) + "\n")
    lines = ["# Compiled against generic path: where `backend=\"auto\"` compiles", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Load average before: {load:.2f}", "",
             f"One training step (forward + sum + backward) of {LAYERS} tanh layers, h = 0.5, "
             "theta = 0.5, tol 1e-6; median over interleaved steps. `auto` compiles where the "
             "ratio is below 1 at this width and every narrower one (irn/auto_crossover.json).",
             "", "| dtype | members | batch per member | width | generic ms / step "
             "| compiled / generic |", "|---|---|---|---|---|---|"]
    lines += [f"| {d} | {e} | {b} | {w} | {1e3 * t:.2f} | {r:.2f} |" for d, e, b, w, t, r in rows]
    out = Path(__file__).with_name("results_crossover.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {TABLE} and {out}")


if __name__ == "__main__":
    main()
