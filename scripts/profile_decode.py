"""Where a decode step's time goes, piece by piece, in every mode: the blocks, each check's parts, the shared exit
block, the K/V fill of skipped blocks, the head, and the gaps between kernels; with CUDA graphs on and off.

    python scripts/profile_decode.py --shape smollm2-135m --batch 1 --check_layers [15,18,22]
    python scripts/profile_decode.py --shape llama2-7b --batch 1 --check_layers [16,20,24]
    python scripts/profile_decode.py --shape smollm2-135m --batch 8 --modes [full,dynamic] --measures [learned]

Random weights of a shape with a shared exit block at the check layers, random prompts, EOS banned, the fallback
and the schedule off; exits forced, so the figures are what the machinery costs, not what trained
exits would choose: ``never`` (a threshold above 1, or a probe that always says no: full depth plus every check) and
``at L`` (threshold 0, or a probe that says yes: every token leaves at the first check L). For each setting:

1. **as it runs** (CUDA graphs, compiled unless ``--compile false``, decisions where ``--decide`` says): µs per decode
   step (the median of ``--repeats`` decodes of ``--tokens`` tokens, prompt excluded); its kernels per step and their
   time under ``torch.profiler``; the gap is the step's time not spent in a kernel (launch gaps, condition nodes).
2. **per piece, graphs on** (compiled with ``--walk_compile true``): the step's plan walked by the host, each piece
   its own graph (the host-decided engine):
   µs of each piece (CUDA events), its kernels and their summed time; the host's own time between pieces (reading
   each check's decision) is the step's time outside every piece.
3. **per part, graphs off** (eager, not compiled, one kernel per operator): every kernel attributed to the innermost
   part of the engine that launched it (block, hold, check, probe, head, confidence, shared block, shared K/V,
   K/V fill, token, inputs, advance): kernels and µs per step.

A speculative cycle counts as a step (its tokens per step are printed). ``--out`` writes every row as JSON.
"""

from __future__ import annotations

import importlib
import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from typing import Callable, Literal

import torch

from earlyexit.cli import run_function
from earlyexit.engine.control import pieces, walk
from earlyexit.engine.core import Core
from earlyexit.errors import EarlyExitError, positive
from earlyexit.probe import forced_probe
from earlyexit.results import markdown_table
from earlyexit.tiny import RANDOM_SHAPES, random_with_exit_block

Mode = Literal["full", "exit", "dynamic", "speculative"]

PARTS = [  # (module, class or None for a function, attribute, label): what an eager kernel is attributed to
    ("earlyexit.engine.fast", "FusedBlock", "pair", "block"),
    ("earlyexit.engine.fast", "FusedBlock", "__call__", "block"),
    ("earlyexit.engine.fast", "FusedBlock", "fill", "shared K/V"),  # the engine before 2026-12-07
    ("earlyexit.engine.core", "Core", "_shared_kv", "shared K/V"),
    ("earlyexit.engine.fast", "KVFill", "__call__", "K/V fill"),
    ("earlyexit.engine.dynamic", "_Exits", "inputs", "hold"),
    ("earlyexit.engine.dynamic", "_Exits", "decide", "check"),
    ("earlyexit.engine.dynamic", "_Exits", "token", "token"),
    ("earlyexit.engine.dynamic", None, "confidence", "confidence"),
    ("earlyexit.engine.dynamic", None, "features", "probe"),
    ("earlyexit.probe", "ExitProbe", "forward", "probe"),  # the engine before 2026-12-07
    ("earlyexit.engine.core", "Core", "_logits", "head"),
    ("earlyexit.engine.core", "Core", "_shared_block", "shared block"),
    ("earlyexit.engine.core", "Core", "_inputs", "inputs"),
    ("earlyexit.engine.core", "Columns", "advance", "advance"),
]
"""The engine's parts by where they live; a part the engine does not have (any more) is skipped."""


def label(fn: Callable) -> str:
    """A piece's name: its ``label`` attribute, else the function that made it (``fill 0`` for ``fill(j=0)``'s ``run``)."""
    if getattr(fn, "label", None):
        return fn.label
    inner = getattr(fn, "__wrapped__", fn)
    names = inner.__qualname__.split(".<locals>.")
    name = names[-2] if names[-1] in ("run", "<lambda>") and len(names) > 1 else names[-1]
    cells = dict(zip(inner.__code__.co_freevars, inner.__closure__ or ()))
    index = cells.get("j") or cells.get("k")
    return f"{name} {index.cell_contents}" if index is not None else name


class Recorder:
    """Names what runs: pieces (``piece:NAME`` ranges, each timed with CUDA events when ``timing``) and the decode
    steps counted."""

    def __init__(self, gpu: bool = True):
        self.gpu = gpu
        self.timing = False
        self.edges = False  # synchronise at every piece's edges (while profiling graph replays)
        self.steps = 0
        self.spans: list[tuple[str, object, object]] = []

    @contextmanager
    def piece(self, name: str):
        with torch.profiler.record_function(f"piece:{name}"):
            if self.edges:
                sync()
                yield
                sync()
                return
            if not self.timing:
                yield
                return
            if not self.gpu:
                begin = time.perf_counter()
                yield
                self.spans.append((name, begin, time.perf_counter()))
                return
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.spans.append((name, begin, end))

    def reset(self, timing: bool = False, edges: bool = False) -> None:
        self.timing, self.edges, self.steps, self.spans = timing, edges, 0, []

    def piece_times(self) -> dict[str, float]:
        """Summed µs of each piece since the reset."""
        sync()
        times: dict[str, float] = defaultdict(float)
        for name, begin, end in self.spans:
            times[name] += begin.elapsed_time(end) * 1e3 if self.gpu else (end - begin) * 1e6
        return times


@contextmanager
def walked(recorder: Recorder):
    """Engines built inside run each step's plan walked by the host, each piece its own graph (or eager without graphs),
    named; a one-piece step (full depth, fixed exits) is one named piece."""
    original_stepper, original_graph = Core._stepper, Core._graph

    def stepper(self, plan, state, decide):
        parts = pieces(plan)
        replays = dict(zip(map(id, parts), self._graphs(parts, state)))

        def run(piece):
            with recorder.piece(label(piece)):
                replays[id(piece)]()

        def step():
            recorder.steps += 1
            walk(plan, run)

        return step

    def graph(self, step, state):
        replay, name = original_graph(self, step, state), label(step)
        if name != "step":  # a prompt pass
            return replay

        def run():
            recorder.steps += 1
            with recorder.piece(name):
                return replay()

        return run

    Core._stepper, Core._graph = stepper, graph
    try:
        yield
    finally:
        Core._stepper, Core._graph = original_stepper, original_graph


@contextmanager
def prompt_named():
    """A program's prompt pass opens a ``piece:prompt`` range (its kernels are not a decode step's)."""
    original = Core._prompt_pass

    def prompt_pass(self, run, shape, state, graph=True):
        replay = original(self, run, shape, state, graph)

        def named(ids):
            with torch.profiler.record_function("piece:prompt"):
                sync()
                out = replay(ids)
                sync()
                return out

        return named

    Core._prompt_pass = prompt_pass
    try:
        yield
    finally:
        Core._prompt_pass = original


@contextmanager
def parts_named():
    """The engine's parts (:data:`PARTS`) open a ``part:LABEL`` range while they run (eager engines only: a compiled
    region would trace the range)."""
    undo = []
    for module_name, owner_name, attribute, name in PARTS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name, None) if owner_name else module
        original = getattr(owner, attribute, None) if owner is not None else None
        if original is None:
            continue

        def named(*args, _original=original, _name=name, **kwargs):
            with torch.profiler.record_function(f"part:{_name}"):
                return _original(*args, **kwargs)

        setattr(owner, attribute, named)
        undo.append((owner, attribute, original))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(undo):
            setattr(owner, attribute, original)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernels(run: Callable[[], object], prefixes: tuple[str, ...] = ("piece",)) -> tuple[Counter, Counter, Counter, Counter]:
    """Profile ``run()``: the kernels' summed µs and launches by the piece that launched them (``step`` outside every
    named piece), with ``part`` in ``prefixes`` followed by the two innermost parts (``piece 0/check/head``), and µs and
    launches by kernel name; the prompt's kernels are left out. Without a GPU the top-level operators stand for
    kernels."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        run()
        sync()
    times, counts, names, launches = Counter(), Counter(), Counter(), Counter()
    events = prof.events()
    if gpu and "part" not in prefixes:  # graph replays: each kernel by the piece whose range holds it in time
        return by_time(events)
    for event in events:
        if not gpu and event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::")):
            event.kernels.append(type("Op", (), dict(name=event.name, duration=event.cpu_time_total))())
        if not event.kernels:
            continue
        owners, parts, node = [], [], event
        while node is not None:
            kind, _, name = node.name.partition(":")
            if kind == "piece" and name:
                owners.append(name)
            elif kind == "part" and name and "part" in prefixes:
                parts.append(name)
            node = node.cpu_parent
        if "prompt" in owners:
            continue
        owner = owners[0] if owners else "step"
        parts = [part for i, part in enumerate(parts) if not i or part != parts[i - 1]]  # a block's __call__ runs its pair
        where = "/".join([owner, *reversed(parts[:2])])
        for kernel in event.kernels:
            times[where] += kernel.duration
            counts[where] += 1
            names[kernel.name] += kernel.duration
            launches[kernel.name] += 1
    return times, counts, names, launches


def by_time(events) -> tuple[Counter, Counter, Counter, Counter]:
    """:func:`kernels` for work replayed from CUDA graphs, whose kernels the profiler links to no operator: each GPU
    event goes to the innermost ``piece:`` range that holds its start (the recorder synchronises at every piece's
    edges while it profiles, so a piece's kernels run inside its range), else to ``step``; the prompt's are left out."""
    spans = sorted(((e.time_range.start, e.time_range.end, e.name.split(":", 1)[1]) for e in events
                    if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("piece:")), key=lambda s: s[1] - s[0])
    times, counts, names, launches = Counter(), Counter(), Counter(), Counter()
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith(("piece:", "part:")):
            continue  # a range's own GPU-side annotation spans its kernels: counting it would count them twice
        start = event.time_range.start
        owner = next((name for begin, end, name in spans if begin <= start <= end), "step")
        if owner == "prompt":
            continue
        duration = event.time_range.end - start
        times[owner] += duration
        counts[owner] += 1
        names[event.name] += duration
        launches[event.name] += 1
    return times, counts, names, launches


def main(shape: str = "smollm2-135m", device: str = "cuda", dtype: str = "bfloat16", batch: int = 1, prompt_len: int = 64, tokens: int = 64,
         check_layers: list[int] = [15, 18, 22],  # noqa: B006 (read only)
         modes: list[Mode] = ["full", "exit", "dynamic", "speculative"],  # noqa: B006
         measures: list[str] = ["softmax", "learned"],  # noqa: B006
         n_draft: list[int] = [1, 4],  # noqa: B006
         compile: bool = True, decide: list[str] = ["host", "device"],  # noqa: B006
         walk: bool = True, walk_compile: bool = False, graphs_off: bool = True, eager_tokens: int = 24, repeats: int = 3,
         top: int = 8,
         out: str | None = None, report_of: str | None = None) -> list[dict]:
    """Profile every mode's decode step piece by piece and print the tables.

    Args:
        shape: random weights of this shape (:data:`earlyexit.tiny.RANDOM_SHAPES`).
        device: cuda (cpu only checks the script: no graphs, no kernels, host times).
        dtype: the weights' dtype (bfloat16, float16 or float32).
        batch: rows decoded together.
        prompt_len: random prompt tokens a row.
        tokens: tokens generated a row by every profiled or timed decode.
        check_layers: the dynamic exit's check layers (the shared exit block serves them); the first is the fixed
            exit, the forced exit and the speculative draft exit.
        modes: full, exit, dynamic, speculative.
        measures: the dynamic exit's measures profiled: softmax, margin, state, learned.
        n_draft: speculative draft lengths.
        compile: compile the decode step (``generation.compile``) where it runs as it does for users.
        decide: where adaptive settings' decisions are taken as they run: host, device (each timed).
        walk: profile each piece on its own (2., graphs on).
        walk_compile: compile the host-walked pieces too (per-piece figures of compiled pieces).
        graphs_off: also profile every setting eagerly, part by part (slow for large shapes).
        eager_tokens: tokens a row of each eager decode (at most ``tokens``; past 16, a deferred K/V fill is in it).
        repeats: timed decodes a setting (the median is kept).
        top: kernels listed by time for each setting as it runs.
        out: write every row here (JSON), after each setting: a run stopped early keeps what it measured.
        report_of: print the tables of a run saved by ``--out`` and profile nothing (its shape, batch, tokens, check
            layers and decisions are read from the file; files saved before it kept them take the flags).
    """
    from earlyexit.engine import Engine
    from earlyexit.engine.control import resolve
    from earlyexit.model import EarlyExitHead

    if shape not in RANDOM_SHAPES:
        raise EarlyExitError(f"shape {shape!r}: choose from {', '.join(sorted(RANDOM_SHAPES))}")
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("tokens", tokens), ("eager_tokens", eager_tokens),
                        ("repeats", repeats), ("top", top)):
        positive(name, value)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EarlyExitError(f"dtype {dtype!r}: choose bfloat16, float16 or float32")
    if any(m not in ("softmax", "margin", "state", "learned") for m in measures):
        raise EarlyExitError(f"measures {measures}: softmax, margin, state or learned")
    n = RANDOM_SHAPES[shape]["num_hidden_layers"]
    checks = sorted(set(check_layers))
    if not checks or checks[0] < 1 or checks[-1] >= n:
        raise EarlyExitError(f"check_layers {check_layers}: layers in 1..{n - 1} (the last layer always exits)")
    if not decide or any(way not in ("host", "device") for way in decide):
        raise EarlyExitError(f"decide {decide}: a list of host and device")
    if report_of:
        try:
            saved = json.loads(open(report_of).read())
            rows = saved["rows"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EarlyExitError(f"report_of {report_of}: not a run saved by --out ({error})") from None
        run = saved.get("run")  # the run's own settings (files saved before they were kept: the flags)
        if run:
            shape, dtype, batch, tokens, checks, compile, decide = (run[k] for k in (
                "shape", "dtype", "batch", "tokens", "check_layers", "compile", "decide"))
            n = RANDOM_SHAPES[shape]["num_hidden_layers"]
        report(rows, shape, dtype, batch, tokens, checks, compile, decide, n, where=f"{saved.get('card')}, torch {saved.get('torch')}")
        return rows
    if device not in ("cuda", "cpu"):
        raise EarlyExitError(f"device {device!r}: cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EarlyExitError("device cuda: no GPU here (--device cpu only checks the script)")
    for way in decide:
        resolve(way)  # refused in one line where conditional nodes cannot be built
    run = dict(shape=shape, dtype=dtype, batch=batch, tokens=tokens, check_layers=checks, compile=compile, decide=decide)
    first = checks[0]
    model = random_with_exit_block(shape, device, getattr(torch, dtype), checks)
    ee = EarlyExitHead(model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    folder = tempfile.mkdtemp(prefix="probes-")
    probes = {sure: forced_probe(checks, model.config.hidden_size, sure, f"{folder}/{sure}") for sure in (None, first)}
    common = dict(max_new_tokens=tokens, ignore_eos=True, fallback=False, schedule="all")  # the machinery as configured

    settings: list[tuple[str, bool, Callable]] = []  # name, adaptive, decode(engine, **options)
    if "full" in modes:
        settings.append(("full depth", False, lambda e, **o: e.generate(ids, mask, [n], **common)[n]))
    if "exit" in modes:
        settings.append((f"fixed exit {first}", False, lambda e, **o: e.generate(ids, mask, [first], **common)[first]))
    if "dynamic" in modes:
        for measure in measures:
            for sure in (None, first):
                where = "never" if sure is None else f"at {first}"
                if measure == "learned":
                    options = dict(measure="learned", probe=probes[sure], threshold=0.5)
                else:
                    options = dict(measure=measure, threshold=1.01 if sure is None else 0.0)
                settings.append((f"dynamic {measure}, {where}", True, lambda e, _o=options, **o: e.generate_dynamic(
                    ids, mask, check_layers=checks, **_o, **o, **common)))
    if "speculative" in modes:
        for d in n_draft:
            settings.append((f"speculative E={first} d={d}", True, lambda e, _d=d, **o: e.generate_speculative(
                ids, mask, first, _d, **o, **common)))

    recorder = Recorder(gpu=device == "cuda")
    rows = [dict(setting=name, shape=shape, batch=batch, compile=compile) for name, _, _ in settings]
    with torch.inference_mode(), prompt_named():
        engine = Engine(ee, compile=compile)  # 1. as it runs: one engine, as one process of a user's runs
        for row, (name, adaptive, decode) in zip(rows, settings):
            for way in decide if adaptive else decide[:1]:
                options = dict(decide=way) if adaptive else {}
                result = decode(engine, **options)  # builds, captures, compiles
                times = []
                for _ in range(repeats):
                    sync()
                    start = time.perf_counter()
                    result = decode(engine, **options)
                    sync()
                    times.append(time.perf_counter() - start)
                steps = getattr(result, "cycles", None) or (tokens - 1)
                row[f"step_us_{way}"] = statistics.median(times) * 1e6 / steps
                row["tokens_per_step"] = (tokens - 1) / steps
                if getattr(result, "layers", None) is not None:
                    row["layers"] = result.layers.float().mean().item()
                t, c, names, launched = kernels(lambda: decode(engine, **options))
                row[f"kernels_per_step_{way}"] = sum(c.values()) / steps
                row[f"kernel_us_per_step_{way}"] = sum(t.values()) / steps
                row[f"top_kernels_{way}"] = [(k[:90], v / steps) for k, v in names.most_common(top)]
                row[f"kernel_names_{way}"] = {k[:120]: (launched[k] / steps, names[k] / steps) for k in launched}
            row.setdefault("layers", float(first if name.startswith("fixed") else n))
            print(f"as it runs: {name}: " + ", ".join(f"{row[f'step_us_{w}']:.1f} µs a step ({w})" for w in decide
                                                      if f"step_us_{w}" in row), flush=True)
            save(rows, out, run)
        with walked(recorder) if walk else nullcontext():  # 2. graphs on, the plan walked by the host, each piece its own graph
            engine = Engine(ee, compile=walk_compile)
            for row, (name, _, decode) in zip(rows, settings) if walk else ():
                decode(engine)
                recorder.reset(timing=True)
                sync()
                start = time.perf_counter()
                decode(engine)
                sync()
                seconds = time.perf_counter() - start
                walls, steps = recorder.piece_times(), max(recorder.steps, 1)
                row["walked_step_us"] = seconds * 1e6 / steps
                recorder.reset(edges=True)
                t, c, _, _ = kernels(lambda: decode(engine))
                profiled = max(recorder.steps, 1)
                row["pieces"] = [dict(piece=p, us=walls[p] / steps, kernels=c[p] / profiled, kernel_us=t[p] / profiled)
                                 for p in walls]
                print(f"walked: {name}: " + ", ".join(f"{piece['piece']} {piece['us']:.1f} µs" for piece in row["pieces"]), flush=True)
                save(rows, out, run)
        if graphs_off:  # 3. graphs off, eager, each kernel by the part that launched it (shorter decodes: per step)
            common["max_new_tokens"] = min(tokens, eager_tokens)  # read by every setting's decode when it runs
            with walked(recorder), parts_named():
                engine = Engine(ee, cuda_graphs=False)
                for row, (name, _, decode) in zip(rows, settings):
                    decode(engine)
                    recorder.reset()
                    t, c, _, _ = kernels(lambda: decode(engine), ("piece", "part"))
                    steps = max(recorder.steps, 1)
                    row["parts_eager"] = [dict(part=p, kernels=c[p] / steps, us=t[p] / steps)
                                          for p in sorted(t, key=t.get, reverse=True)]
                    print(f"eager: {name}", flush=True)
                    save(rows, out, run)
    report(rows, shape, dtype, batch, tokens, checks, compile, decide, n)
    return rows


def save(rows: list[dict], out: str | None, run: dict) -> None:
    """Every row so far to ``out`` (JSON) with the ``run``'s settings, after each setting: a run stopped early keeps
    what it measured."""
    if out:
        with open(out, "w") as f:
            json.dump(dict(card=card(), torch=torch.__version__, rows=rows, run=run), f, indent=1)


def report(rows: list[dict], shape: str, dtype: str, batch: int, tokens: int, checks: list[int], compile: bool,
           decide: list[str], n: int, where: str | None = None) -> None:
    """Print the summary, each setting's pieces (graphs on) and parts (graphs off), and what one check costs;
    ``where``: the card and torch of a saved run (default: this machine's)."""
    way = decide[0]
    full = next((row for row in rows if row["setting"] == "full depth"), None)
    print(f"\n{shape} (random weights, {dtype}{', compiled' if compile else ''}) on "
          f"{where or f'{card()}, torch {torch.__version__}'}: batch {batch}, {tokens} new tokens, check layers {checks}, "
          "shared exit block\n")
    header = ["setting", "layers a token", "tokens a step"]
    for w in decide:
        header += [f"µs a step ({w})", f"× full depth ({w})", f"kernels a step ({w})", f"kernel µs ({w})", f"gap µs ({w})"]
    table = []
    for row in rows:
        cells = [row["setting"], f"{row['layers']:.1f}", f"{row['tokens_per_step']:.2f}"]
        for w in decide:
            us = row.get(f"step_us_{w}")
            if us is None:
                cells += ["", "", "", "", ""]
                continue
            base = full[f"step_us_{way}"] if full else None
            speed = f"{base / us * row['tokens_per_step']:.2f}" if base else ""
            kernel_us = row[f"kernel_us_per_step_{w}"]
            cells += [f"{us:.1f}", speed, f"{row[f'kernels_per_step_{w}']:.1f}", f"{kernel_us:.1f}", f"{us - kernel_us:.1f}"]
        table.append(cells)
    print("**As it runs** (CUDA graphs; µs a step: median wall-clock; kernels under torch.profiler):\n")
    print(markdown_table(header, table, align="l" + "r" * (len(header) - 1)))
    for row in rows:
        if "pieces" not in row:
            continue
        print(f"\n**{row['setting']}**, graphs on, walked by the host, each piece its own graph: "
              f"{row['walked_step_us']:.1f} µs a step\n")
        inside = sum(p["us"] for p in row["pieces"])
        lines = [[p["piece"], f"{p['us']:.1f}", f"{p['kernels']:.1f}", f"{p['kernel_us']:.1f}", f"{p['us'] - p['kernel_us']:.1f}"]
                 for p in row["pieces"]]
        lines.append(["(host, between pieces)", f"{row['walked_step_us'] - inside:.1f}", "", "", ""])
        print(markdown_table(["piece", "µs a step", "kernels", "kernel µs", "gap µs"], lines, align="lrrrr"))
        if "parts_eager" in row:
            print(f"\n{row['setting']}, graphs off (eager, not compiled), by part:\n")
            print(markdown_table(["piece/part", "kernels a step", "kernel µs a step"],
                                 [[p["part"], f"{p['kernels']:.1f}", f"{p['us']:.1f}"] for p in row["parts_eager"]], align="lrr"))
        for w in decide:
            if row.get(f"top_kernels_{w}"):
                print(f"\ntop kernels as it runs ({w}): " + "; ".join(f"{k} {v:.1f} µs" for k, v in row[f"top_kernels_{w}"]))
    fixed = next((row for row in rows if row["setting"].startswith("fixed exit")), None)
    if fixed:
        print()
        for row in rows:
            if row["setting"].startswith("dynamic") and row["setting"].endswith(f"at {checks[0]}"):
                for w in decide:
                    if f"step_us_{w}" in row:
                        print(f"{row['setting']} ({w}): {fixed[f'step_us_{way}'] / row[f'step_us_{w}']:.3f}× the speed of the "
                              f"{fixed['setting']}")
    if full:
        layer_us = full[f"step_us_{way}"] / n
        print()
        for row in rows:
            if row["setting"].startswith("dynamic") and row["setting"].endswith("never"):
                for w in (w for w in decide if f"step_us_{w}" in row):
                    cost = (row[f"step_us_{w}"] - full[f"step_us_{way}"]) / len(checks)
                    split = ""
                    if f"kernel_us_per_step_{w}" in row and f"kernel_us_per_step_{way}" in full:
                        # the kernels' share: steadier than wall-clock where a check is a sliver of a step (7B shape)
                        kernels = (row[f"kernel_us_per_step_{w}"] - full[f"kernel_us_per_step_{way}"]) / len(checks)
                        split = f"; of it {kernels:.1f} µs kernels = {kernels / layer_us:.2f} layers, the rest gaps"
                    print(f"{row['setting']}: one check decided on the {w} costs {cost:.1f} µs = "
                          f"{cost / layer_us:.2f} layers of full depth ({layer_us:.1f} µs a layer){split}")
        for row in rows:
            if row["setting"].startswith("dynamic") and row["setting"].endswith("never"):
                for w in (w for w in decide if row.get(f"kernel_names_{w}") and full.get(f"kernel_names_{way}")):
                    print(f"\n{row['setting']} ({w}) against full depth, the kernels whose launches a step differ:\n")
                    print(markdown_table(["kernel", "launches a step", "full depth", "more", "µs a step more"],
                                         added(row[f"kernel_names_{w}"], full[f"kernel_names_{way}"]), align="lrrrr"))


def added(step: dict[str, tuple[float, float]], full: dict[str, tuple[float, float]], limit: int = 40) -> list[list[str]]:
    """The kernels (``name: (launches, µs)`` a step) a setting launches more or less often than full depth, most
    launches more first, at most ``limit`` rows: what its checks add, kernel by kernel."""
    lines = []
    for name in set(step) | set(full):
        (n, us), (n_full, us_full) = step.get(name, (0.0, 0.0)), full.get(name, (0.0, 0.0))
        if abs(n - n_full) >= 0.05:
            lines.append((n - n_full, [name, f"{n:.1f}", f"{n_full:.1f}", f"{n - n_full:+.1f}", f"{us - us_full:+.1f}"]))
    return [cells for _, cells in sorted(lines, key=lambda line: -line[0])[:limit]]


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    run_function(main, "python scripts/profile_decode.py")
