"""Decoding speed of every exit mode against Hugging Face ``generate``, side by side in one run.

    python -m earlyexit.bench [--model.name smollm2-135m-instruct] [--model.adapter DIR] [--random_config llama2-7b]
                              [--model.device cuda] [--batch 1] [--generation.max_new_tokens 128] [--modes '[full,hf]']

Every mode decodes the same prompts to the same fixed length (EOS is banned, as ``min_new_tokens`` does for
HF), greedy, after a warm-up run; the median of ``--repeats`` timed runs is reported as tokens per second
(batch × new tokens / seconds) and as a ratio to our own full-depth decode. Modes:

- ``hf``: ``model.generate`` (dynamic cache, eager); ``hf_static``: ``cache_implementation="static"``, which
  compiles the forward with ``torch.compile`` on a GPU; ``hf_assistant``: ``assistant_early_exit=E`` (HF's
  LayerSkip, batch 1 only), each with the model's own layers.
- ``full``: our engine at full depth (on the fast path of llama-style families unless ``--generation.fast false``);
  ``generic``: the same through the model's own blocks, for comparison; ``exit``: our engine at each quarter exit; ``all_exits``: all quarter
  exits in one batched pass; ``dynamic``: CALM exit at ``--generation.threshold`` (``--generation.measure``,
  ``--generation.min_layer``); ``speculative``: self-speculative decoding from each ``--draft_layer`` with each
  ``--n_draft`` (greedy text compared with ``full``).

``--random_config llama2-7b`` builds a randomly initialised model of Llama-2-7B's shape: honest for speed,
meaningless for quality and for acceptance rates. An adapter is merged into the weights before timing.
``--out_dir`` keeps the rows (``bench.json``) and the resolved config.

The bandwidth bound of a mode that reads the weights of blocks 1..L once per step is batch × bandwidth / (bytes of
those blocks + the final norm and head): the card's memory bandwidth (by its name, or ``--bandwidth_gbs``) over
the bytes a step must read. Each such mode's share of its bound is reported.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from earlyexit.adapters import shared_block
from earlyexit.cli import make_parser, save_config
from earlyexit.data import SAMPLE
from earlyexit.engine import Engine
from earlyexit.errors import EarlyExitError, in_unit, positive, report_errors
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs
from earlyexit.model import EarlyExitHead, quarter_layers
from earlyexit.results import markdown_table
from earlyexit.tiny import RANDOM_SHAPES

Mode = Literal["hf", "hf_static", "hf_assistant", "full", "generic", "exit", "all_exits", "dynamic", "speculative"]
MODES: tuple[str, ...] = Mode.__args__


@dataclass
class BenchArgs:
    """What to time.

    Args:
        random_config: random weights of this shape instead of ``--model.name`` (speed only).
        data: Alpaca records the prompts come from: ``alpaca-sample``, a local file or a hub id.
        batch: prompts decoded together.
        prompt_len: prompt length with ``--random_config`` (random token ids).
        modes: the modes to time (see above).
        draft_layer: speculative draft exits E (default N/2).
        n_draft: speculative draft lengths d.
        draft_threshold: adaptive drafting: a cycle stops drafting once no row's draft is this sure (0: always d).
        repeats: timed runs per mode (the median is reported), after one warm-up run.
        out_dir: also write ``bench.json`` (the rows) and ``config.yaml`` here.
        bandwidth_gbs: the card's memory bandwidth in GB/s (default: by its name, see :data:`BANDWIDTH_GBS`).
    """

    random_config: str | None = None
    data: str = SAMPLE
    batch: int = 1
    prompt_len: int = 64
    modes: list[Mode] = field(default_factory=lambda: list(MODES))
    draft_layer: list[int] | None = None
    n_draft: list[int] = field(default_factory=lambda: [4])
    draft_threshold: float = 0.0
    repeats: int = 3
    out_dir: str | None = None
    bandwidth_gbs: float | None = None

    def __post_init__(self):
        positive("batch", self.batch)
        positive("prompt_len", self.prompt_len)
        positive("repeats", self.repeats)
        for d in self.n_draft:
            positive("n_draft", d)
        in_unit("draft_threshold", self.draft_threshold)
        if self.random_config is not None and self.random_config not in RANDOM_SHAPES:
            raise EarlyExitError(f"random_config {self.random_config!r}: choose from {', '.join(sorted(RANDOM_SHAPES))}")


BANDWIDTH_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                 "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0}
"""Peak memory bandwidth (GB/s) of cards by a part of their name, first match wins (vendors' data sheets)."""


def bandwidth(device_name: str, given: float | None = None) -> float | None:
    """Bytes per second the card can read: ``given`` GB/s, else :data:`BANDWIDTH_GBS` by name; None if unknown."""
    if given:
        return given * 1e9
    return next((gbs * 1e9 for part, gbs in BANDWIDTH_GBS.items() if part in device_name), None)


def weight_bytes(ee: EarlyExitHead, layers: int) -> int:
    """Bytes a decode step reads to run blocks 1..``layers`` and the exit (the final norm and the head)."""
    tensors = {p.data_ptr(): p for block in list(ee.blocks)[:layers] for p in block.parameters()}
    tensors.update({p.data_ptr(): p for p in (*ee.norm.parameters(), *ee.head.parameters())})
    return sum(p.numel() * p.element_size() for p in tensors.values())


def build_parser():
    parser = make_parser("python -m earlyexit.bench", __doc__)
    parser.add_class_arguments(ModelArgs, "model")
    parser.add_class_arguments(GenerationArgs, "generation", default=GenerationArgs(max_new_tokens=128))
    parser.add_class_arguments(BenchArgs, as_group=False)
    return parser


def load(model_args: ModelArgs, bench: BenchArgs) -> tuple[torch.nn.Module, object | None]:
    from dataclasses import replace

    from earlyexit.loading import load_model
    from earlyexit.names import RANDOM_PREFIX

    if bench.random_config:
        model_args = replace(model_args, name=RANDOM_PREFIX + bench.random_config)
    model, tokenizer = load_model(model_args)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter (exit adapters alone leave a plain model)
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def prompts(bench: BenchArgs, model, tokenizer, generation: GenerationArgs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``--batch`` left-padded prompts: Alpaca records 0.. (the evaluation split), or random ids of a fixed length;
    fitted to the model's window with ``generation.max_new_tokens`` (``generation.context``)."""
    from earlyexit.context import fit_prompts, window_of
    from earlyexit.tokens import pad

    device = next(model.parameters()).device
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        encoded = torch.randint(100, model.config.vocab_size, (bench.batch, bench.prompt_len), generator=gen).tolist()
        pad_id = 0
    else:
        from earlyexit.data import encode_prompt, read_records

        encoded = [encode_prompt(record, tokenizer) for record in read_records(bench.data)[: bench.batch]]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if generation is not None:
        encoded = fit_prompts(encoded, window_of(model.config), generation.max_new_tokens, generation.context,
                              "benchmark prompt")
    ids = pad(encoded, pad_id, "left")
    mask = pad([[1] * len(e) for e in encoded], 0, "left")
    return ids.to(device), mask.to(device)


def timed(fn, repeats: int, device: torch.device):
    """Median seconds of ``repeats`` runs after one warm-up, and the last run's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(model_args: ModelArgs, generation: GenerationArgs, bench: BenchArgs) -> list[dict]:
    modes = list(dict.fromkeys(bench.modes))
    model, tokenizer = load(model_args, bench)
    ee = EarlyExitHead(model)
    if "dynamic" in modes:  # its check layers, before any decoding
        ee.check_layer(generation.min_layer_of(ee.n_layers))
        generation.check_layers_of(ee.n_layers)
    options = dict(compile=generation.compile, compile_mode=generation.compile_mode)
    generic = Engine(ee, fast=False, **options) if "generic" in bench.modes else None
    engine = Engine(ee, fast=generation.fast, **options)
    greedy = generation.but(do_sample=False)
    device = next(model.parameters()).device
    ids, mask = prompts(bench, model, tokenizer, generation)  # before any decoding
    n, new, batch = ee.n_layers, generation.max_new_tokens, ids.shape[0]
    eos = model.generation_config.eos_token_id
    draft_layers = bench.draft_layer or [max(1, n // 2)]
    repeats = bench.repeats
    rows: list[dict] = []
    texts: dict[str, torch.Tensor] = {}

    def hf(**extra):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=eos,
                                  pad_token_id=model.generation_config.pad_token_id, **extra)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = bandwidth(card, bench.bandwidth_gbs) if device.type == "cuda" else None

    def add(mode, seconds, tokens=None, depth=None, **extra):
        rows.append(dict(mode=mode, seconds=seconds, tokens_per_s=batch * new / seconds, **extra))
        if depth and peak:
            bound = batch * peak / weight_bytes(ee, depth)
            rows[-1].update(bound_tokens_per_s=bound, share_of_bound=batch * new / seconds / bound)
        if tokens is not None:
            texts[mode] = tokens.cpu()
        print(f"{mode:>24}: {batch * new / seconds:9.1f} tokens/s  {seconds:.3f} s", flush=True)

    with torch.inference_mode():
        if "full" in modes or "speculative" in modes or "hf_assistant" in modes:
            seconds, out = timed(lambda: engine.generate(ids, mask, [n], greedy, ignore_eos=True)[n], repeats, device)
            add("full", seconds, out.tokens, depth=n, fast=engine.fast is not None)
        if "generic" in modes:
            seconds, out = timed(lambda: generic.generate(ids, mask, [n], greedy, ignore_eos=True)[n], repeats, device)
            add("generic", seconds, out.tokens, depth=n)
        if "hf" in modes:
            seconds, out = timed(hf(), repeats, device)
            add("hf", seconds, out, depth=n)
        if "hf_static" in modes:
            seconds, out = timed(hf(cache_implementation="static"), repeats, device)
            add("hf_static", seconds, out, depth=n)
        if "exit" in modes:
            for layer in quarter_layers(n)[:-1]:
                seconds, out = timed(lambda: engine.generate(ids, mask, [layer], greedy, ignore_eos=True)[layer],
                                     repeats, device)
                add(f"exit {layer}", seconds, depth=layer, layer=layer, ideal=layer / n)
        if "all_exits" in modes:
            exits = quarter_layers(n)
            seconds, out = timed(lambda: engine.generate(ids, mask, exits, greedy, ignore_eos=True), repeats, device)
            add(f"all_exits {','.join(map(str, exits))}", seconds, exits=exits)
        if "dynamic" in modes:
            seconds, out = timed(lambda: engine.generate_dynamic(ids, mask, greedy, ignore_eos=True), repeats, device)
            add(f"dynamic {greedy.measure} {greedy.threshold}", seconds, mean_layers=float(out.layers.float().mean()),
                full_from=out.full_from, checks=list(out.checks))
        for draft_layer in draft_layers:
            for n_draft in bench.n_draft:
                if "speculative" in modes:
                    seconds, out = timed(lambda: engine.generate_speculative(ids, mask, draft_layer, n_draft, greedy,
                                                                             draft_threshold=bench.draft_threshold,
                                                                             ignore_eos=True), repeats, device)
                    adaptive = f" stop<{bench.draft_threshold}" if bench.draft_threshold else ""
                    add(f"speculative E={draft_layer} d={n_draft}{adaptive}", seconds, acceptance=out.acceptance,
                        full_from=out.full_from, **agreement(out.tokens.cpu(), texts["full"]))
                if "hf_assistant" in modes and batch == 1:
                    seconds, out = timed(hf(assistant_early_exit=draft_layer, num_assistant_tokens=n_draft,
                                            num_assistant_tokens_schedule="constant"), repeats, device)
                    add(f"hf_assistant E={draft_layer} d={n_draft}", seconds, **agreement(out.cpu(), texts["full"]))
        if "hf_assistant" in modes and batch != 1:
            print(f"{'hf_assistant':>24}: skipped (HF's assistant_early_exit decodes batch 1 only)")
    full = next((row["seconds"] for row in rows if row["mode"] == "full"), None)
    for row in rows:
        row["vs_full"] = full / row["seconds"] if full else None
        if "ideal" in row and full:
            row["cost_vs_full"] = row["seconds"] / full
    for reference in ("generic", "hf", "hf_static"):
        if reference in texts and "full" in texts:
            rows.append(dict(mode="check", reference=reference, **agreement(texts["full"], texts[reference])))
    return rows


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two greedy decodes of the same prompts agree: share of identical rows, mean common prefix."""
    same = a == b
    prefix = torch.where(same.all(1), a.shape[1], (~same).int().argmax(1))
    return dict(identical=float(same.all(1).float().mean()), common_prefix=float(prefix.float().mean()))


def describe(model_args: ModelArgs, generation: GenerationArgs, bench: BenchArgs) -> str:
    name = bench.random_config or model_args.name + (f" + {Path(model_args.adapter).name} (merged)" if model_args.adapter else "")
    on_gpu = torch.cuda.is_available() and model_args.device != "cpu"
    device = torch.cuda.get_device_name() if on_gpu else platform.processor() or "CPU"
    compiled = f" · engine compiled ({generation.compile_mode})" if generation.compile else ""
    return f"{name} · {device} · torch {torch.__version__} · batch {bench.batch} · {generation.max_new_tokens} new tokens{compiled}"


def table(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        if row["mode"] == "check":
            continue
        notes = []
        if "cost_vs_full" in row:
            notes.append(f"cost {row['cost_vs_full']:.2f} of full (L/N = {row['ideal']:.2f})")
        if "exits" in row:
            notes.append(f"cost {1 / row['vs_full']:.2f} of full")
        if "mean_layers" in row:
            notes.append(f"mean layers {row['mean_layers']:.1f}")
        if "acceptance" in row:
            notes.append(f"acceptance {row['acceptance']:.2f}")
        if "checks" in row:
            notes.append(f"checks {row['checks']}" if row["checks"] else "no check paid here: full depth")
        if row.get("full_from") == 0:
            notes.append("speculation did not pay here: full depth")
        elif row.get("full_from") is not None:
            notes.append(f"slower than full depth: full depth from token {row['full_from']}")
        if "share_of_bound" in row:
            notes.append(f"{row['share_of_bound']:.0%} of the bandwidth bound ({row['bound_tokens_per_s']:,.0f})")
        if row.get("fast"):
            notes.append("fast path")
        if "identical" in row:
            notes.append(f"greedy text identical to full in {row['identical']:.0%} of rows, "
                         f"mean common prefix {row['common_prefix']:.0f} tokens")
        vs = f"{row['vs_full']:.2f}" if row.get("vs_full") else ""
        cells.append([row["mode"], f"{row['tokens_per_s']:.1f}", f"{row['seconds']:.3f}", vs, "; ".join(notes)])
    lines = [markdown_table(["mode", "tokens/s", "s", "× our full depth", "notes"], cells, align="lrrrl")]
    for check in (row for row in rows if row["mode"] == "check"):
        lines.append(f"\nOur full-depth greedy text equals `{check['reference']}`'s in {check['identical']:.0%} of rows "
                     f"(mean common prefix {check['common_prefix']:.0f} tokens).")
    return "\n".join(lines)


ADAPTIVE_MODES = ("dynamic", "speculative")


def shared_block_modes(model_args: ModelArgs, generation: GenerationArgs, bench: BenchArgs) -> BenchArgs:
    """The engine decodes a shared exit block (exit adapters of kind ``block``) at fixed exits on any path, but reads
    it in dynamic exits and self-speculation on its fast path only (llama-style families, ``--generation.fast`` not
    false). Where that path does not run, the default modes leave those two out (said on stderr); asking for either is
    refused before loading."""
    adapter = model_args.adapter
    if not adapter or not shared_block(adapter):
        return bench
    adaptive = [mode for mode in bench.modes if mode in ADAPTIVE_MODES]
    if not adaptive:
        return bench
    if generation.fast is not False and bench.random_config is not None:  # the random shapes are llama-style
        return bench
    from earlyexit.arch import off_fast_path

    config = None
    if generation.fast is not False:
        from transformers import AutoConfig

        from earlyexit.names import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(model_args.name))
    why = off_fast_path(config, generation.fast)
    if why is None:
        return bench
    if list(bench.modes) != list(MODES):
        raise EarlyExitError(f"--modes {', '.join(adaptive)}: the shared exit block of --model.adapter {adapter} is read "
                             f"by dynamic exits and self-speculation on the engine's fast path only, which {why} do not "
                             "take: leave them out of --modes")
    print(f"modes dynamic and speculative left out: the shared exit block of {adapter} is read by them on the engine's "
          f"fast path only, which {why} do not take", file=sys.stderr)
    return replace(bench, modes=[mode for mode in bench.modes if mode not in ADAPTIVE_MODES])


@report_errors
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    model_args, generation, bench = ModelArgs(**cfg.model), GenerationArgs(**cfg.generation), BenchArgs(**{
        name: cfg[name] for name in BenchArgs.__dataclass_fields__})
    bench = shared_block_modes(model_args, generation, bench)
    save_config(parser, cfg, bench.out_dir)
    rows = run(model_args, generation, bench)
    print()
    print(describe(model_args, generation, bench))
    print(table(rows))
    if bench.out_dir:
        (Path(bench.out_dir) / "bench.json").write_text(json.dumps(dict(config=parser.dump(cfg, format="json"), rows=rows), indent=1))


if __name__ == "__main__":
    main()
