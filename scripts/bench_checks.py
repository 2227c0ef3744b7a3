"""What a dynamic exit's check costs, by confidence measure: random weights of a shape, a shared exit block, exits forced.

    python scripts/bench_checks.py --shape smollm2-135m --device cuda --batch 1 --check_layers [15,18,22]

Every setting decodes the same random prompts for ``max_new_tokens`` tokens (EOS ignored) on the engine's fast path
(compiled unless ``--compile false``), timed after one untimed call that builds and captures its programs; the median
of ``repeats`` runs. Each dynamic setting runs once per ``--decide`` (``host``: a CUDA graph per piece and a host
synchronisation per check, the engine before conditional nodes; ``device``: one graph a step, the checks decided by
the GPU), with the fallback to full depth off. Exits are forced, so the rows isolate what the machinery costs, not
what trained exits would choose:

* ``full depth`` and ``fixed exit L`` (through the shared block): the references.
* ``softmax, never sure`` (threshold above 1): full depth plus a softmax check at every check layer (the shared block
  and the full-vocabulary head for the token, then a host synchronisation).
* ``learned, never sure`` (a probe that always says no): full depth plus a learned check at every check layer (the
  probe's dot product and the shared block's keys and values, then a host synchronisation).
* ``softmax, sure at L`` / ``learned, sure at L``: every token exits at check layer L (softmax: threshold 0 with L the
  first check; learned: a probe that says yes from L on); the blocks above L are skipped.

The cost of one check is (never sure − full depth) / number of checks, also in layers of full depth's time.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from earlyexit.cli import run_function
from earlyexit.engine.control import Nodes, resolve
from earlyexit.generation import Decide
from earlyexit.errors import EarlyExitError, positive
from earlyexit.tiny import RANDOM_SHAPES, random_with_exit_block


def main(shape: str = "smollm2-135m", device: str = "cuda", dtype: str = "bfloat16", batch: int = 1, prompt_len: int = 64,
         max_new_tokens: int = 64, check_layers: list[int] = [15, 18, 22], repeats: int = 3,  # noqa: B006
         decide: list[Decide] = ["host", "device"], compile: bool = True, nodes: Nodes = "auto") -> list[dict]:  # noqa: B006
    """Time forced exits by confidence measure and print a table.

    Args:
        shape: random weights of this shape (:data:`earlyexit.tiny.RANDOM_SHAPES`).
        device: cuda or cpu.
        dtype: the weights' dtype (bfloat16, float16 or float32).
        batch: rows decoded together.
        prompt_len: random prompt tokens a row.
        max_new_tokens: tokens generated a row.
        check_layers: the dynamic exit's check layers (the shared block serves them).
        repeats: timed runs a setting (the median is kept).
        decide: where the dynamic settings' checks are decided (each timed): host, device (a GPU only).
        compile: compile the decode step (``generation.compile``).
        nodes: how the device-decided step builds its conditional nodes (auto, torch or driver).
    """
    from earlyexit.engine import Engine
    from earlyexit.model import EarlyExitHead
    from earlyexit.probe import forced_probe

    if shape not in RANDOM_SHAPES:
        raise EarlyExitError(f"shape {shape!r}: choose from {', '.join(sorted(RANDOM_SHAPES))}")
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens), ("repeats", repeats)):
        positive(name, value)
    if not decide or any(way not in ("host", "device") for way in decide):
        raise EarlyExitError(f"decide {decide}: a list of host and device")
    if "device" in decide:
        resolve("device", nodes)  # refused in one line where conditional nodes cannot be built
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EarlyExitError(f"dtype {dtype!r}: choose bfloat16, float16 or float32")
    if device == "cuda" and not torch.cuda.is_available():
        raise EarlyExitError("device cuda: no GPU here (use --device cpu)")
    n = RANDOM_SHAPES[shape]["num_hidden_layers"]
    checks = sorted(set(check_layers))
    if not checks or checks[0] < 1 or checks[-1] >= n:
        raise EarlyExitError(f"check_layers {check_layers}: layers in 1..{n - 1} (the last layer always exits)")
    model = random_with_exit_block(shape, device, getattr(torch, dtype), checks)
    ee = EarlyExitHead(model)
    engine = Engine(ee, compile=compile, nodes=nodes)
    if engine.fast is None:
        raise EarlyExitError(f"{shape}: no fast path, so no skipping to time")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    folder = tempfile.mkdtemp(prefix="probes-")

    def probe(sure_from: int | None) -> str:  # a probe that says yes from layer sure_from on, else no
        return forced_probe(checks, model.config.hidden_size, sure_from, f"{folder}/{sure_from}")

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        layers = out.layers.float().mean().item() if hasattr(out, "layers") else None
        return statistics.median(times), layers

    common = dict(max_new_tokens=max_new_tokens, ignore_eos=True, fallback=False)
    settings = [("full depth", lambda: engine.generate(ids, mask, [n], **common)[n], n)]
    settings += [(f"fixed exit {layer}", lambda layer=layer: engine.generate(ids, mask, [layer], **common)[layer], layer) for layer in checks]
    for way in decide:
        dynamic = dict(check_layers=checks, decide=way, **common)
        settings.append((f"softmax, never sure ({way})", lambda d=dynamic: engine.generate_dynamic(ids, mask, threshold=1.01, **d), None))
        settings.append((f"learned, never sure ({way})", lambda d=dynamic: engine.generate_dynamic(
            ids, mask, threshold=0.5, measure="learned", probe=probe(None), **d), None))
        settings.append((f"softmax, sure at {checks[0]} ({way})", lambda d=dynamic: engine.generate_dynamic(ids, mask, threshold=0.0, **d),
                         None))
        for layer in checks:
            settings.append((f"learned, sure at {layer} ({way})", lambda layer=layer, d=dynamic: engine.generate_dynamic(
                ids, mask, threshold=0.5, measure="learned", probe=probe(layer), **d), None))
    rows = []
    with torch.inference_mode():
        for name, fn, depth in settings:
            seconds, layers = timed(fn)
            rows.append(dict(setting=name, seconds=seconds, tokens_per_s=batch * max_new_tokens / seconds,
                             layers=layers if layers is not None else depth))
    full = rows[0]["seconds"]
    per_layer = full / n
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{shape} (random weights, {dtype}{', compiled' if compile else ''}) on {where}: batch {batch}, prompt {prompt_len}, "
          f"{max_new_tokens} new tokens, check layers {checks}, shared exit block, median of {repeats}\n")
    print("| setting | layers a token | tokens/s | × full depth |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['layers']:.1f} | {row['tokens_per_s']:,.1f} | {full / row['seconds']:.2f} |")
    print()
    for way in decide:
        for measure in ("softmax", "learned"):
            never = next(r for r in rows if r["setting"] == f"{measure}, never sure ({way})")["seconds"]
            cost = (never - full) / len(checks) / max_new_tokens
            print(f"a {measure} check decided on the {way} costs {cost * 1e6:,.1f} µs a step = "
                  f"{cost * max_new_tokens / per_layer:.2f} layers of full depth")
    return rows


if __name__ == "__main__":
    run_function(main, "python scripts/bench_checks.py")
