"""Dynamic (CALM) exits: answer quality and speed against the average depth used, next to the fixed exits,
self-speculation and HF; and the calibration of the threshold.

    python scripts/sweep_dynamic.py [--model.adapter checkpoints/smollm2_ee/adapter] [--records 40]
                                    [--thresholds '[0,0.3,0.5,0.7,0.9,1.01]'] [--generation.measure softmax]
                                    [--generation.check_every 7] [--plot depth.png]
    python scripts/sweep_dynamic.py --offset 200 --records 100 --target 0.95 ...   # calibrate off the evaluation split
    python scripts/sweep_dynamic.py --measures '{softmax: [0.5, 0.9], learned: [0.5, 0.7]}' --generation.probe DIR ...
    python scripts/sweep_dynamic.py --model.device cuda --batch 1 --speculative '[[15, 4], [22, 4]]' --hf true \
                                    --speed_plot speed.png --out_dir results/sweep    # every mode: quality vs speed

Greedy answers to Alpaca records ``offset``.. (0: the evaluation split, never trained on) from our engine: one
dynamic run per threshold (each token exits at the first check layer, from ``--generation.min_layer`` (default N/4)
every ``--generation.check_every`` layers, whose confidence reaches the threshold) and one run per fixed exit (the
last layer always among them: the full-depth reference). Prints a markdown table of ROUGE-L (rouge-score, stemmed
F-measure, mean over examples), mean layers per generated token and generated tokens per second (wall-clock of that
setting's batches, prompts included, after one untimed pass that builds and warms that setting's programs) with
the ratio to full depth, and plots ROUGE-L against depth. ``--speculative`` adds self-speculative settings (with
their acceptance) and ``--hf true`` the model's own ``generate``; ``--speed_plot`` draws ROUGE-L against tokens/s of
every setting. With ``--target``, prints the threshold with the fewest layers per token that keeps that share of
full depth's ROUGE-L.
"""

from __future__ import annotations

import sys
import time

import torch

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, encode_prompt, read_records
from earlyexit.engine import Engine
from earlyexit.engine.control import resolve
from earlyexit.errors import EarlyExitError, in_unit, non_negative, positive, require
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, load_model
from earlyexit.metrics import build_metric
from earlyexit.model import EarlyExitHead, ExitLayers, parse_exit_layers
from earlyexit.tokens import pad


def sweep(
    model: ModelArgs = ModelArgs(),
    generation: GenerationArgs = GenerationArgs(max_new_tokens=48),
    data: str = SAMPLE,
    records: int = 40,
    batch: int = 20,
    thresholds: list[float] = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01],  # noqa: B006 (read only)
    measures: dict[str, list[float]] | None = None,
    fixed: ExitLayers = "8,12,15,18,22,26,30",
    offset: int = 0,
    target: float | None = None,
    plot: str | None = None,
    speculative: list[list[float]] = [],  # noqa: B006 (read only)
    draft_threshold: float = 0.0,
    hf: bool = False,
    calibrate: int = 16,
    calibrate_offset: int = 200,
    speed_plot: str | None = None,
    out_dir: str | None = None,
) -> list[dict]:
    """Dynamic (CALM) exits: answer quality against the average depth used, next to the fixed exits.

    Args:
        model: the model (an adapter is merged before decoding).
        generation: decoding options; ``measure``, ``min_layer`` and ``max_new_tokens`` are read (greedy).
        data: Alpaca records: ``alpaca-sample``, a local file or a hub id; records 0.. are used.
        records: how many records.
        batch: prompts per batch.
        thresholds: dynamic thresholds to sweep (of ``generation.measure``).
        measures: several confidence measures in one run instead, each with its thresholds (e.g. ``{softmax: [0.5,
            0.9], learned: [0.5, 0.7]}``; ``learned`` reads ``generation.probe``).
        fixed: fixed exits drawn beside the curve (the last layer is always added: it is the full-depth reference).
        offset: first record used: 0 is the evaluation split; calibrate on records it does not hold (e.g. 200 for the
            shipped sample, whose first 200 records are the evaluation split).
        target: calibration: pick the threshold with the fewest layers per token whose ROUGE-L is at least this share
            of full depth's (e.g. 0.95), and print it.
        plot: write the figure of quality against depth here.
        speculative: self-speculative settings ``[E, d]`` (draft exit, drafted tokens per cycle) or ``[E, d, tau]`` (with
            adaptive drafting at tau) timed beside them.
        draft_threshold: adaptive drafting of the settings that name no tau (0: always d drafts).
        hf: time the model's own ``generate`` at full depth beside them.
        calibrate: records (from ``calibrate_offset``) on which each adaptive setting times what it runs
            (``generation.schedule auto``: the check layers that pay, whether speculation pays); 0: the first batch.
        calibrate_offset: their first record: by default after the shipped sample's evaluation split (0-199), so that
            no evaluated record chooses how it is decoded.
        speed_plot: write the figure of quality against tokens/s of every setting here.
        out_dir: keep the resolved config here, and the rows (``sweep.json``: what ``scripts/figures.py`` draws).
    """
    for option, value in (("records", records), ("batch", batch)):
        positive(option, value)
    in_unit("draft_threshold", draft_threshold)
    drafting = []
    for setting in speculative:
        require(len(setting) in (2, 3), "speculative", setting, "[E, d] or [E, d, tau]")
        positive("speculative E", int(setting[0]))
        positive("speculative d", int(setting[1]))
        tau = float(setting[2]) if len(setting) == 3 else draft_threshold
        in_unit("speculative tau", tau)
        drafting.append((int(setting[0]), int(setting[1]), tau))
    non_negative("offset", offset)
    non_negative("calibrate", calibrate)
    non_negative("calibrate_offset", calibrate_offset)
    if calibrate and calibrate_offset < offset + records and offset < calibrate_offset + calibrate:
        raise EarlyExitError(f"calibration records {calibrate_offset}..{calibrate_offset + calibrate - 1} overlap the "
                             f"evaluated records {offset}..{offset + records - 1}: set --calibrate_offset past them")
    if target is not None:
        in_unit("target", target, low_open=True)
    measures = {generation.measure: list(thresholds)} if measures is None else measures
    for measure, values in measures.items():
        generation.but(measure=measure)  # checked (learned needs generation.probe) before the model loads
        for value in values:
            non_negative(f"measures.{measure} threshold", value)
    args = model
    lm, tokenizer = load_model(args)
    if hasattr(lm, "merge_and_unload"):  # a LoRA adapter (exit adapters alone leave a plain model)
        lm = lm.merge_and_unload()
    ee = EarlyExitHead(lm)
    for draft_layer, _, _ in drafting:
        if ee.check_layer(draft_layer) >= ee.n_layers:
            raise EarlyExitError(f"speculative E = {draft_layer} must be below the last layer {ee.n_layers}")
    ee.check_layer(generation.min_layer_of(ee.n_layers))
    generation.check_layers_of(ee.n_layers)  # before any decoding
    engine = Engine(ee, compile=generation.compile, fast=generation.fast, compile_mode=generation.compile_mode)
    if engine.cuda_graphs:
        print(f"decisions: {resolve(generation.decide, engine.nodes)[0]}, fallback to full depth "
              f"{'on' if generation.fallback else 'off'}", file=sys.stderr)
    greedy = generation.but(do_sample=False)
    device = next(lm.parameters()).device
    chosen = read_records(data)[offset : offset + records]
    if not chosen:
        raise EarlyExitError(f"no records from offset {offset} in {data!r}")
    references = [record["output"] for record in chosen]
    batches = []
    for start in range(0, len(chosen), batch):
        encoded = [encode_prompt(record, tokenizer) for record in chosen[start : start + batch]]
        batches.append((pad(encoded, tokenizer.pad_token_id, "left").to(device),
                        pad([[1] * len(e) for e in encoded], 0, "left").to(device)))
    calibration = None
    if calibrate:
        cal = [encode_prompt(record, tokenizer) for record in read_records(data)[calibrate_offset : calibrate_offset + calibrate]]
        if not cal:
            raise EarlyExitError(f"no calibration records from {calibrate_offset} in {data!r}")
        calibration = (pad(cal, tokenizer.pad_token_id, "left").to(device), pad([[1] * len(e) for e in cal], 0, "left").to(device))
    rouge = build_metric("rougeL")

    def score(texts: list[str]) -> float:
        rouge.reset()
        rouge.update(texts, references)
        return rouge.aggregate(rouge.values())

    def decode(tokens, n_tokens):
        return [tokenizer.decode(t[:n].tolist(), skip_special_tokens=True).strip() for t, n in zip(tokens, n_tokens)]

    def timed(run_batch) -> tuple[list[str], list[int], float, list]:
        """Every batch through ``run_batch`` (→ a Generation), once to build and warm its programs, then timed."""
        for ids, mask in batches:
            run_batch(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, answers, lengths, outs = time.perf_counter(), [], [], []
        for ids, mask in batches:
            out = run_batch(ids, mask)
            outs.append(out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        for out in outs:
            answers += decode(out.tokens, out.n_tokens)
            lengths += out.n_tokens.tolist()
        return answers, lengths, seconds, outs

    n = ee.n_layers
    model_name = args.name + (f" + {args.adapter.rstrip('/').split('/')[-2]}" if args.adapter and "/" in args.adapter.rstrip("/") else "")
    where = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    about = dict(model=model_name, card=where, batch=batch, records=f"{offset}-{offset + len(chosen) - 1}",
                 max_new_tokens=greedy.max_new_tokens, check_layers=greedy.check_layers_of(n))

    rows = []

    def keep(row: dict) -> None:
        """A measured row, written to ``sweep.json`` at once (marked incomplete): a run cut short keeps every row."""
        rows.append(row)
        if out_dir:
            import json
            from pathlib import Path

            (Path(out_dir) / "sweep.json").write_text(json.dumps(dict(about, rows=rows, complete=False), indent=1) + "\n")
        print(f"measured {row['kind']} {row['setting']}: {row['speed']:,.1f} tokens/s, ROUGE-L {row['rougeL']:.3f}",
              file=sys.stderr, flush=True)

    fixed = sorted(set(parse_exit_layers(fixed, n)) | {n})
    pad_id = tokenizer.pad_token_id
    with torch.inference_mode():
        for layer in fixed:  # one exit at a time, so each gets its own time
            answers, lengths, seconds, _ = timed(lambda ids, mask: engine.generate(ids, mask, [layer], greedy, pad_token_id=pad_id)[layer])
            keep(dict(kind="fixed", setting=layer, depth=float(layer), rougeL=score(answers), speed=sum(lengths) / seconds))
            if layer == n:
                full_answers = answers
        for measure, values in measures.items():
            for threshold in values:
                known = set(engine.calibrations)
                answers, lengths, seconds, outs = timed(lambda ids, mask: engine.generate_dynamic(
                    ids, mask, greedy, threshold=threshold, measure=measure, pad_token_id=pad_id, calibration=calibration))
                used = [layer for out in outs for row, k in zip(out.layers, out.n_tokens) for layer in row[:k].tolist()]
                depth = sum(used) / max(1, len(used))
                keep(dict(kind=f"dynamic {measure}", setting=threshold, depth=depth, rougeL=score(answers),
                                 speed=len(used) / seconds, full=at_full_depth(outs), runs=schedule(outs),
                                 calibration=calibrated(engine, set(engine.calibrations) - known)))
                print(f"{measure} threshold {threshold}: mean layers {depth:.2f}, {seconds:.1f} s, {rows[-1]['runs']}"
                      + (f"; calibration {rows[-1]['calibration']}" if rows[-1]["calibration"] else ""), flush=True)
        for draft_layer, n_draft, tau in drafting:
            known = set(engine.calibrations)
            answers, lengths, seconds, outs = timed(lambda ids, mask: engine.generate_speculative(
                ids, mask, draft_layer, n_draft, greedy, draft_threshold=tau, pad_token_id=pad_id, calibration=calibration))
            accepted = sum(out.accepted for out in outs) / max(1, sum(out.drafted for out in outs))
            name = f"E={draft_layer} d={n_draft}" + (f" tau={tau:g}" if tau else "")
            keep(dict(kind="speculative", setting=name, depth=float(n), rougeL=score(answers),
                             speed=sum(lengths) / seconds, acceptance=accepted, full=at_full_depth(outs), runs=schedule(outs),
                             same=sum(a == b for a, b in zip(answers, full_answers)) / len(answers),
                             calibration=calibrated(engine, set(engine.calibrations) - known)))
        if hf:
            answers, lengths, seconds, _ = timed(lambda ids, mask: ee.generate(ids, mask, n, greedy, pad_token_id=pad_id))
            keep(dict(kind="HF generate", setting=n, depth=float(n), rougeL=score(answers), speed=sum(lengths) / seconds))
        # full depth once more, after every other setting: the process has not slowed down (no recompiles, no leftovers)
        answers, lengths, seconds, _ = timed(lambda ids, mask: engine.generate(ids, mask, [n], greedy, pad_token_id=pad_id)[n])
        keep(dict(kind="fixed", setting=n, depth=float(n), rougeL=score(answers), speed=sum(lengths) / seconds, again=True))

    print(f"\n{model_name} on {where}, records {offset}..{offset + len(chosen) - 1} of {data}, greedy, at most "
          f"{greedy.max_new_tokens} new tokens, batch {batch}, check layers {greedy.check_layers_of(ee.n_layers)}, "
          f"fast path {'on' if engine.fast is not None else 'off'}\n")
    full_speed = next(row["speed"] for row in rows if row["kind"] == "fixed" and row["setting"] == n)
    print("| exit | setting | mean layers per token | ROUGE-L | tokens/s | × full depth | acceptance | text = full depth's | runs "
          "| fell back |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        accepted = f"{row['acceptance']:.2f}" if "acceptance" in row else ""
        fell = f"{row['full']:.0%}" if "full" in row else ""
        same = f"{row['same']:.0%}" if "same" in row else ""
        setting = f"{row['setting']} (again, last)" if row.get("again") else row["setting"]
        print(f"| {row['kind']} | {setting} | {row['depth']:.2f} | {row['rougeL']:.3f} | {row['speed']:,.1f} | "
              f"{row['speed'] / full_speed:.2f} | {accepted} | {same} | {row.get('runs', '')} | {fell} |")
    if any("runs" in row for row in rows):
        where_from = (f"records {calibrate_offset}..{calibrate_offset + calibrate - 1}" if calibrate else "each batch size's first batch")
        print(f"\nruns: what generation.schedule {greedy.schedule} chose for the setting, timed on {where_from} (checks: the "
              "layers checked; full depth: no check or speculation paid)")
    if any("same" in row for row in rows):
        print("text = full depth's: the share of answers identical to full depth's (greedy speculation is exact up to "
              "the numerics of a batched verify: bf16 may flip a near tie)")
    if any("full" in row for row in rows):
        print("fell back: the share of tokens decoded at full depth after an adaptive mode timed itself slower than full "
              "depth within an answer (generation.fallback)")
    if out_dir:
        import json
        from pathlib import Path

        (Path(out_dir) / "sweep.json").write_text(json.dumps(dict(about, rows=rows), indent=1) + "\n")
    if target is not None:
        full = next(row["rougeL"] for row in rows if row["kind"] == "fixed" and row["setting"] == ee.n_layers)
        for measure in measures:
            which = "" if len(measures) == 1 else f" ({measure})"
            good = [row for row in rows if row["kind"] == f"dynamic {measure}" and row["rougeL"] >= target * full]
            if good:
                best = min(good, key=lambda row: row["depth"])
                print(f"\ncalibrated threshold{which}: {best['setting']} (ROUGE-L {best['rougeL']:.3f} = "
                      f"{best['rougeL'] / max(full, 1e-9):.0%} of full depth's {full:.3f}, {best['depth']:.2f} layers per token)")
            else:
                print(f"\nno threshold{which} keeps {target:.0%} of full depth's ROUGE-L {full:.3f}: sweep higher thresholds")
    if plot:
        from earlyexit.plotting import sweep_depth

        sweep_depth(rows, title=f"{model_name}: quality vs depth").savefig(plot, dpi=120)
        print(f"\nplot: {plot}")
    if speed_plot:
        from earlyexit.plotting import sweep_speed

        sweep_speed(rows, title=f"{model_name} on {where}, batch {batch}: quality vs speed").savefig(speed_plot, dpi=120)
        print(f"plot: {speed_plot}")
    return rows


def schedule(outs) -> str:
    """What the batches of a setting ran (``generation.schedule``): the check layers, speculation, or full depth; the
    most frequent first."""
    counts: dict[str, int] = {}
    for out in outs:
        if hasattr(out, "checks"):
            ran = f"checks {list(out.checks)}" if out.checks else "full depth"
        else:
            ran = "full depth" if out.full_from == 0 else "speculation"
        counts[ran] = counts.get(ran, 0) + 1
    return "; ".join(sorted(counts, key=counts.get, reverse=True))


def calibrated(engine, keys) -> str:
    """What the schedule timed for a setting (``keys``: its new entries in ``engine.calibrations``): each candidate's
    milliseconds a token and, for dynamic checks, layers a token on the calibration prompts; a rescheduled setting's
    share of calls that fell back."""
    parts = []
    for key in keys:
        times, depths = engine.calibrations[key], engine.calibration_depths.get(key, {})
        for candidate, seconds in times.items():
            if candidate == "fell back":  # the engine's RESCHEDULE_CALLS: this share of calls fell back
                parts.append(f"then full depth ({seconds:.0%} of the last calls fell back)")
                continue
            name = (f"checks {list(candidate)}" if candidate else "full depth") if isinstance(candidate, tuple) else (
                "speculation" if candidate else "full depth")
            layers = f", {depths[candidate]:.1f} layers" if candidate in depths else ""
            parts.append(f"{name}: {seconds * 1e3:.3f} ms/token{layers}")
    return "; ".join(parts)


def at_full_depth(outs) -> float:
    """The share of generated tokens decoded at full depth after an adaptive mode fell back to it (``full_from``)."""
    total = sum(int(out.n_tokens.sum()) for out in outs)
    after = sum(int((out.n_tokens - out.full_from).clamp(min=0).sum()) for out in outs if out.full_from is not None)
    return after / max(1, total)


if __name__ == "__main__":
    run_function(sweep, "python scripts/sweep_dynamic.py")
