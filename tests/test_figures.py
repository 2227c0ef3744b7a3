"""scripts/figures.py: every figure under docs/img is drawn by it from the results docs/figures.yaml names."""

from pathlib import Path

import yaml

from commands import ROOT, refusal, run_command

MANIFEST = ROOT / "docs" / "figures.yaml"


def outputs(entries: list[dict]) -> set[str]:
    """The files a manifest's entries write (a lens entry: one per answer and lens, and the dataset figure)."""
    made = set()
    for entry in entries:
        if entry["kind"] != "lens":
            made.add(entry["out"])
            continue
        import json

        directory = ROOT / entry["results"][0]
        for file in directory.glob("lens_*.json"):
            k = file.stem.split("_")[1]
            for name in [*json.loads(file.read_text())["lenses"], "summary"]:
                made.add(entry["out"].format(k=k, name=name.replace(" ", "_")))
        if (directory / "dataset_lens.json").is_file():
            made.add(str(Path(entry["out"]).parent / "dataset_lens.png"))
    return made


def test_every_figure_in_the_docs_is_drawn_from_named_results():
    entries = yaml.safe_load(MANIFEST.read_text())
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "img").rglob("*.png")}
    assert on_disk == outputs(entries)
    for entry in entries:
        for directory in entry["results"]:
            assert (ROOT / directory / "SOURCE.md").is_file(), f"{directory} says where its numbers come from"


def test_figures_redraws_every_kind(tmp_path, monkeypatch, capsys):
    """The first figure of each kind in the docs' manifest, redrawn from its results (the test above checks that every
    entry's results are there)."""
    entries = list({entry["kind"]: entry for entry in reversed(yaml.safe_load(MANIFEST.read_text()))}.values())
    assert {entry["kind"] for entry in entries} >= {"layers", "compare", "depth", "speed", "judge", "lens"}
    expected = len(outputs(entries))
    for entry in entries:
        entry["out"] = str(tmp_path / Path(entry["out"]).relative_to("docs/img"))
        entry["results"] = [str(ROOT / directory) for directory in entry["results"]]
    manifest = tmp_path / "figures.yaml"
    manifest.write_text(yaml.safe_dump(entries))
    monkeypatch.chdir(tmp_path)
    assert run_command("figures.py", ["--manifest", str(manifest)], monkeypatch) == 0
    written = set(capsys.readouterr().out.split())
    assert written and all(Path(out).is_file() and Path(out).stat().st_size > 10_000 for out in written)
    assert len(written) == expected


def test_a_missing_results_directory_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "figures.yaml"
    manifest.write_text(yaml.safe_dump([{"out": str(tmp_path / "x.png"), "kind": "layers", "results": [str(tmp_path / "nowhere")]}]))
    assert "results directory" in refusal("figures.py", ["--manifest", str(manifest)], monkeypatch, capsys)
    manifest.write_text(yaml.safe_dump([{"out": "x.png", "kind": "pie", "results": ["."]}]))
    assert "each figure needs out, kind" in refusal("figures.py", ["--manifest", str(manifest)], monkeypatch, capsys)


def test_the_three_models_figure_pairs_base_and_fine_tuned_runs_against_relative_depth(tmp_path, monkeypatch, capsys):
    import json

    runs = []
    for name, n in (("a", 30), ("b", 18)):
        for tuned in (0, 1):
            directory = tmp_path / f"{name}{tuned}"
            directory.mkdir()
            layers = [round(n * q / 4) for q in (1, 2, 3, 4)]
            rows = [{"layer": l, "rougeL": 0.1 * (1 + tuned) * l / n} for l in layers]
            (directory / "metrics.json").write_text(json.dumps({"model": name, "n_layers": n, "layers": rows}))
            runs.append(str(directory))
    manifest = tmp_path / "figures.yaml"
    out = str(tmp_path / "models.png")
    manifest.write_text(yaml.safe_dump([{"out": out, "kind": "models", "results": runs, "labels": ["a", "b"]}]))
    assert run_command("figures.py", ["--manifest", str(manifest)], monkeypatch) == 0
    assert capsys.readouterr().out.split() == [out] and Path(out).stat().st_size > 10_000
    manifest.write_text(yaml.safe_dump([{"out": out, "kind": "models", "results": runs[:3], "labels": ["a", "b"]}]))
    assert "in pairs" in refusal("figures.py", ["--manifest", str(manifest)], monkeypatch, capsys)


def test_points_on_one_another_share_one_label():
    """The depth figure's settings that ran the same thing (full depth reached by several thresholds and measures) get
    one label naming each, not labels drawn over each other; the speed figure's likewise."""
    from earlyexit.plotting import quality_vs_depth, quality_vs_speed

    curves = {"dynamic learned (threshold)": ([15.2, 30, 30], [0.17, 0.22, 0.22], [0.5, 0.99, 1.01]),
              "dynamic softmax (threshold)": ([30], [0.22], [0.9])}
    fig = quality_vs_depth([15, 30], [0.18, 0.22], curves)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == ["0.5", "learned 0.99, learned 1.01, softmax 0.9"]
    fig = quality_vs_speed({"fixed": ([100, 200], [0.2, 0.18], ["30", "15"]),
                            "dynamic learned": ([100.5, 150], [0.2, 0.19], ["1.01", "0.9"])})
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.9", "15", "fixed 30, dynamic learned 1.01"]
