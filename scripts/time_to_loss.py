"""Time to loss: how long a training recipe takes to reach another recipe's validation loss, on every exit.

    python scripts/time_to_loss.py                                   # today's SmolLM2 recipe against the fast one
    python scripts/time_to_loss.py --baseline configs/smollm2_lora.yaml --baseline_args '[--data.pack, false]' \\
                                   --candidate configs/smollm2_lora_fast.yaml --every 10

Trains the baseline recipe to its end with :class:`earlyexit.train.TimeToLoss` measuring the cross-entropy of
every trained exit on the validation split every ``--baseline_every`` steps and at the last. The measuring is not
counted, and neither is Lightning's own validation, which is switched off. Its last measurement is the target.
Then it trains the candidate, measuring every ``--every`` steps, until every exit is at or below the target, or
until its own last step. Each run is a ``python -m earlyexit.train`` of its own, in ``--work_dir``. A baseline
already measured there (``baseline/clock.json``) is reused, unless ``--rerun_baseline``.

Prints, per exit, the target and the candidate's cross-entropy at the step where it reached the target. Then it
prints both runs' seconds of training (from the first step, compilation included) and their ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from earlyexit.cli import run_function
from earlyexit.errors import EarlyExitError, positive
from earlyexit.results import markdown_table


Arg = str | int | float | bool
"""One item of a command line given as a list: ``[--model.optim.lr, 1e-3]`` parses the number as a number."""


def command_line(items: list[Arg]) -> list[str]:
    """The items as command-line words (``true``/``false`` for booleans, as the configs write them)."""
    return [str(item).lower() if isinstance(item, bool) else str(item) for item in items]


def train(config: str, extra: list[Arg], root: Path, every: int, targets: Path | None) -> dict:
    """One ``earlyexit.train`` run with the clock; its records."""
    clock = root / "clock.json"
    args = [sys.executable, "-m", "earlyexit.train", "--config", config, *command_line(extra),
            "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=earlyexit.train.TimeToLoss", "--trainer.callbacks.out", str(clock),
            "--trainer.callbacks.every", str(every)]
    if targets is not None:
        args += ["--trainer.callbacks.targets_from", str(targets)]
    print("$ " + " ".join(args[1:]), file=sys.stderr, flush=True)
    if subprocess.run(args).returncode != 0:
        raise EarlyExitError(f"the training run of {config} failed (its output is above)")
    return json.loads(clock.read_text())


def time_to_loss(
    baseline: str = "configs/smollm2_lora.yaml",
    baseline_args: list[Arg] = ["--data.pack", "false"],  # noqa: B006 (read only): today's recipe pads its batches
    candidate: str = "configs/smollm2_lora_fast.yaml",
    candidate_args: list[Arg] = [],  # noqa: B006
    baseline_every: int = 150,
    every: int = 5,
    work_dir: str = "results/time_to_loss",
    rerun_baseline: bool = False,
) -> dict:
    """How long ``candidate`` takes to reach ``baseline``'s validation cross-entropy on every exit.

    Args:
        baseline: the reference recipe (a training config), trained to its last step.
        baseline_args: command-line changes to the baseline config.
        candidate: the recipe timed against it.
        candidate_args: command-line changes to the candidate config.
        baseline_every: steps between the baseline's measurements (its last step is always measured).
        every: steps between the candidate's measurements: the resolution of its time to the target.
        work_dir: where both runs write (``baseline/``, ``candidate/``).
        rerun_baseline: train the baseline again even if ``work_dir`` holds its measurements.
    """
    positive("baseline_every", baseline_every)
    positive("every", every)
    for config in (baseline, candidate):
        if not Path(config).is_file():
            raise EarlyExitError(f"config {config!r} not found")
    work = Path(work_dir)
    base_clock = work / "baseline" / "clock.json"
    if base_clock.is_file() and not rerun_baseline:
        print(f"reusing the baseline measured in {base_clock}", file=sys.stderr)
        base = json.loads(base_clock.read_text())
    else:
        base = train(baseline, baseline_args, work / "baseline", baseline_every, None)
    cand = train(candidate, candidate_args, work / "candidate", every, base_clock)
    target, last = base["records"][-1], cand["records"][-1]
    at = next((r for r in cand["records"] if r["step"] == cand["reached"]), None)
    shown = at or last
    rows = [[layer, f"{ce:.3f}", f"{shown['ce'][layer]:.3f}", "yes" if shown["ce"][layer] <= ce else "no"]
            for layer, ce in target["ce"].items()]
    print(markdown_table(["exit", f"baseline CE at step {target['step']} (target)",
                          f"candidate CE at step {shown['step']}", "reached"], rows, align="rrrl"))
    ratio = target["seconds"] / shown["seconds"]
    if at is None:
        print(f"\nThe candidate did not reach the target within its {last['step']} steps ({last['seconds']:.1f} s of "
              f"training); the baseline took {target['seconds']:.1f} s.")
    else:
        print(f"\nbaseline: {target['seconds']:.1f} s of training to step {target['step']}; candidate: "
              f"{at['seconds']:.1f} s to step {at['step']}: {ratio:.2f}× faster.")
    return {"baseline_seconds": target["seconds"], "candidate_seconds": shown["seconds"], "reached": at is not None,
            "speedup": ratio}


if __name__ == "__main__":
    run_function(time_to_loss, "python scripts/time_to_loss.py")
