"""tools/readme_tables.py: the README's measured tables, their markers, and rendering from the runs'
own JSON (small fixtures here: nothing is trained). Also ``bench_step.py --methods``'s check."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


if not (ROOT / "tools" / "readme_tables.py").exists() or not (ROOT / "README.md").exists():  # pragma: no cover
    pytest.skip("the README's tables are checked in a source checkout (tools/, README.md): not here",
                allow_module_level=True)
tool = _load("readme_tables", ROOT / "tools" / "readme_tables.py")


# -- fixtures ------------------------------------------------------------------------------------


def stat(mean, std=0.0, ci95=None):
    return {"mean": mean, "std": std, "ci95": ci95}


def demo_results(model, entries, seeds=3, first_seed=0, environment=None, labels=None):
    """A results.json as run_demo writes it: entries = {name: (acc, std, ci95, memorized, m-sharpness,
    λ_max, relative time)}; None measures are 'not measured'."""
    summary = {}
    for name, (acc, std, ci, mem, sharp, top, rel) in entries.items():
        summary[name] = {"seeds": seeds, "test_accuracy": stat(acc, std, ci), "memorized": stat(mem),
                         "m_sharpness": stat(sharp), "lambda_max": stat(top), "relative_time": rel}
    return {
        "config": {"model": model, "rho": 0.3, "asam_rho": 4.0, "seeds": seeds, "first_seed": first_seed,
                   "optimizers": list(entries), "threads": 1},
        "environment": environment or {"torch": "9.1.0", "sharpness": "0.1.0", "python": "3.11.7", "threads": 1},
        "summary": summary,
        "wall_seconds": 60.0,
        "labels": labels or {},
    }


def write_demo_folder(folder: Path, results_by_model: dict) -> None:
    """The demo's report layout: one sub-folder per model, each with results.json and summary.json."""
    for model, results in results_by_model.items():
        sub = folder / model if len(results_by_model) > 1 else folder
        sub.mkdir(parents=True, exist_ok=True)
        labels = results.pop("labels")
        (sub / "results.json").write_text(json.dumps(results))
        (sub / "summary.json").write_text(json.dumps(
            [{"optimizer": name, "label": labels.get(name, name.upper())} for name in results["summary"]]))


MLP = {"sgd": (0.7111, 0.0096, 0.0238, 0.934, 0.0981, 6.571, 1.0),
       "sam": (0.9179, 0.0150, 0.0372, 0.131, 0.0502, 1.162, 2.151),
       "asam": (0.8969, 0.0093, 0.0231, 0.238, 0.0594, 1.434, 1.834)}
CNN = {"sgd": (0.7167, 0.0214, 0.0531, 1.0, 0.112, 7.68, 1.0),
       "sam": (0.9549, 0.0070, 0.0174, 0.022, 0.044, 1.79, 1.74),
       "asam": (0.9364, 0.0077, 0.0191, 0.136, None, None, 1.79)}


def valid_readme() -> str:
    """A README with every block the tool knows, well formed."""
    parts = ["# project\n\nSome text.\n"]
    for name, block in tool.BLOCKS.items():
        commands = " ".join(f'command="{c}"' for c in block.commands())
        table = "| a | b |\n|---|---|\n| 1 | 2 |\n\n" if block.kind == "table" else "Some generated text.\n\n"
        parts.append(f"<!-- table:{name} {commands} -->\n\n{table}Measured with torch 2.13.\n<!-- /table:{name} -->\n")
    return "\n".join(parts) + "\nThe end.\n"


# -- the real README -------------------------------------------------------------------------------


def test_the_readme_passes_check_without_running_anything(monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("--check ran a command")

    monkeypatch.setattr(tool.subprocess, "run", no_run)
    assert tool.main(["--check"]) == 0, capsys.readouterr().out


def test_the_readmes_commands_are_accepted_by_todays_command_lines():
    """A stated command must still parse: a renamed option would otherwise rot in the markers."""
    from sharpness.cli import build_parser

    sys.path.insert(0, str(ROOT / "benches"))
    bench_step = _load("bench_step_for_readme", ROOT / "benches" / "bench_step.py")
    bench_efficient = _load("bench_efficient_for_readme", ROOT / "benches" / "bench_efficient.py")
    blocks, problems = tool.find_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert not problems
    commands = {c for b in blocks for c in b.commands}
    assert commands == {run.command for run in tool.RUNS.values()}
    for command in commands:
        words = shlex.split(command)
        if words[:3] == ["python", "-m", "sharpness"]:
            args, extra = build_parser("sharpness").parse_known_args(words[3:] + ["--out", "x"])
            assert not extra and args.command == "demo", command
        elif words[1] == "benches/bench_step.py":
            bench_step.parse_args(words[2:] + ["--json", "x.json"])
        else:
            assert words[1] == "benches/bench_efficient.py", command
            bench_efficient.parse_args(words[2:] + ["--out", "x"])


# -- markers -------------------------------------------------------------------------------------


def test_a_valid_readme_has_no_problems():
    assert tool.check(valid_readme()) == []


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda t: t.replace("<!-- /table:demo -->", ""), "has no end marker"),
        (lambda t: t.replace("table:speed ", "table:spead ", 1).replace("/table:speed", "/table:spead"), "unknown block"),
        (lambda t: t.replace("--models mlp,cnn", "--models mlp"), "this tool runs"),
        (lambda t: t.replace("Measured with torch 2.13.\n<!-- /table:demo", "\n<!-- /table:demo"), "'Measured ...'"),
        (lambda t: t.replace("|---|---|\n| 1 | 2 |\n\nMeasured with torch 2.13.\n<!-- /table:demo",
                             "Measured with torch 2.13.\n<!-- /table:demo"), "no markdown table"),
        (lambda t: t + "\n<!-- /table:demo -->\n", "end marker without its start"),
        (lambda t: t.replace("<!-- table:demo command=", "<!-- table:demo cmd=", 1), "malformed start marker"),
        (lambda t: t.replace("<!-- /table:demo -->", "", 1).replace("<!-- table:variants", "<!-- /table:demo -->\n"
                                                                     "<!-- table:variants", 1), None),
        (lambda t: t + t[t.index("<!-- table:demo"):t.index("<!-- /table:demo -->") + 20], "appears twice"),
        (lambda t: t.replace("<!-- /table:speed -->", "<!-- table:finder -->\n<!-- /table:speed -->"),
         "contains another block"),
    ],
)
def test_check_reports_each_broken_marker(breakage, message):
    problems = tool.check(breakage(valid_readme()))
    if message is None:  # a moved end marker that still closes its block: nothing to report
        assert problems == []
    else:
        assert any(message in p for p in problems), problems


def test_check_reports_a_block_missing_from_the_readme():
    text = valid_readme()
    start, end = text.index("<!-- table:speed"), text.index("<!-- /table:speed -->") + len("<!-- /table:speed -->")
    assert tool.check(text[:start] + text[end:]) == ["block 'speed' is not in the README"]


def test_rewrite_replaces_the_body_and_nothing_else():
    text = valid_readme()
    once = tool.rewrite(text, "demo", "| x |\n|---|\n\nMeasured now.")
    assert once.count("| x |") == 1 and tool.check(once) == []
    before, after = text.split("<!-- /table:demo -->")
    new_before, new_after = once.split("<!-- /table:demo -->")
    assert new_after == after
    assert new_before.startswith(before[:before.index("<!-- table:demo")])
    assert tool.rewrite(once, "demo", "| x |\n|---|\n\nMeasured now.") == once  # idempotent
    with pytest.raises(KeyError):
        tool.rewrite(text.replace("table:demo", "table:other"), "demo", "x")


# -- provenance ------------------------------------------------------------------------------------


def test_paragraphs_wrap_at_100_columns_but_never_inside_a_code_span():
    text = tool.paragraph("word " * 18 + "`python tools/readme_tables.py --only efficient` reruns it.")
    assert "`python tools/readme_tables.py --only efficient`" in text.splitlines()[1]
    assert all(len(line) <= 100 for line in text.splitlines())


def test_provenance_says_what_was_not_recorded():
    sentence = tool.provenance_sentence(tool.Provenance(torch="2.13.0", cores=2, threads="1 thread"), "seeds 0–2")
    assert sentence == ("Measured with torch 2.13.0, numpy not recorded, sharpness not recorded on 2 cores, 1 thread; "
                        "seeds 0–2.")
    full = tool.Provenance(date="2026-12-05", torch="2.15.0", numpy="2.4.6", sharpness="0.1.0", python="3.11.7",
                           cpu="AMD EPYC", cores=2, threads="1 thread", seconds=150)
    assert tool.provenance_sentence(full) == ("Measured on 2026-12-05 with torch 2.15.0, numpy 2.4.6, sharpness 0.1.0 "
                                              "(Python 3.11.7) on AMD EPYC (2 cores, 1 thread); 2.5 min.")


def test_torch_version_is_read_with_its_build_tag_without_importing_torch():
    torch = pytest.importorskip("torch")
    assert tool.torch_version() == torch.__version__


def test_combined_provenance_lists_disagreeing_versions_and_adds_times():
    combined = tool.combine([tool.Provenance(torch="2.13.0", seconds=60, date="2026-12-04"),
                             tool.Provenance(torch="2.15.0", numpy="2.4.6", seconds=30, date="2026-12-05")])
    assert combined.torch == "2.13.0 and 2.15.0" and combined.numpy == "2.4.6"
    assert combined.seconds == 90 and combined.date == "2026-12-05"


# -- the demo and the variants -------------------------------------------------------------------------


def test_demo_table_rows():
    table = tool.render_demo_table({"mlp": demo_results("mlp", MLP), "cnn": demo_results("cnn", CNN)})
    lines = table.splitlines()
    assert lines[0] == ("| model | optimizer | test acc (%) | memorised wrong labels (%) | m-sharpness | λ_max "
                        "| time/epoch |")
    assert lines[2] == "| MLP | SGD | 71.11 ± 0.96 | 93.4 | 0.098 | 6.57 | 1.00× |"
    assert lines[3] == "| MLP | SAM ρ=0.3 | **91.79 ± 1.50** | 13.1 | 0.050 | 1.16 | 2.15× |"
    assert lines[4] == "| MLP | ASAM ρ=4 | 89.69 ± 0.93 | 23.8 | 0.059 | 1.43 | 1.83× |"
    assert lines[7] == "| CNN | ASAM ρ=4 | 93.64 ± 0.77 | 13.6 | n/a | n/a | 1.79× |"


def test_demo_block_from_a_report_folder_states_versions_and_spread(tmp_path):
    report = tmp_path / "report"
    write_demo_folder(report, {"mlp": demo_results("mlp", MLP), "cnn": demo_results("cnn", CNN)})
    (report / tool.RUN_RECORD).write_text(json.dumps({"date": "2026-12-05", "torch": "ignored: the run's own wins",
                                                      "numpy": "2.4.6", "cpu": "AMD EPYC", "cores": 2}))
    readme = tmp_path / "README.md"
    readme.write_text(valid_readme())
    assert tool.main(["--readme", str(readme), "--only", "demo", "--from", str(report)], print_fn=lambda _: None) == 0
    text = readme.read_text()
    assert "| MLP | SAM ρ=0.3 | **91.79 ± 1.50** |" in text
    block = text[text.index("<!-- table:demo"):text.index("<!-- /table:demo")]
    sentence = " ".join(block.split("\n\n")[-1].split())
    assert sentence.startswith("Measured on 2026-12-05 with torch 9.1.0, numpy 2.4.6, sharpness 0.1.0 (Python 3.11.7) "
                               "on AMD EPYC (2 cores, 1 thread); seeds 0–2; 2.0 min.")
    assert "± is the standard deviation over the 3 seeds" in sentence
    assert "the 95% interval of a mean test accuracy is ±1.7–5.3 points here" in sentence
    assert sentence.endswith("`python tools/readme_tables.py --only demo` reruns it.")
    assert all(len(line) <= 100 for line in block.split("\n\n")[-1].splitlines())
    assert tool.check(text) == []


VARIANT_OPTIMIZERS = {
    "A": ("sgd", "sam", "asam", "looksam", "everyk", "aesam", "esam", "sampa", "saf", "mesa"),
    "B": ("sgd", "sam", "gsam", "friendly", "wsam", "rsam", "monge", "ssamd", "gam", "crsam", "lightsam", "adasam",
          "bsam", "lets"),
    "C": ("sgd", "everyk"),
    "D": ("sgd", "looksam", "everyk"),
}


def variant_runs(drop=None):
    runs = {}
    for run, names in VARIANT_OPTIMIZERS.items():
        entries = {}
        for i, name in enumerate(names):
            if (run, name) == drop:
                continue
            acc = 0.9356 if (run, name) == ("A", "looksam") else 0.70 + 0.01 * i
            rel = {"A": 1.90, "B": 1.94}[run] if name == "sam" else 1.0 + 0.1 * i
            entries[name] = (acc, 0.01, 0.0075 if name == "looksam" else 0.0127, 0.5, None, None, rel)
        runs[run] = demo_results("mlp", entries, seeds=5, labels={n: f"{n} ({run})" for n in names})
    return runs


def test_variants_table_follows_the_readme_order_and_names_each_run():
    table = tool.render_variants_table(variant_runs())
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    named = [(r[0].lstrip("| "), r[-1].rstrip(" |")) for r in rows]
    assert len(named) == 25 and named[-1] == ("lets (B)", "B")
    # every-k SAM and LookSAM at other k (runs C and D) next to their k=5 rows of run A
    assert named[:9] == [("sgd (A)", "A"), ("sam (A)", "A"), ("asam (A)", "A"), ("looksam (A)", "A"),
                         ("everyk (A)", "A"), ("everyk (C)", "C"), ("looksam (D)", "D"), ("everyk (D)", "D"),
                         ("aesam (A)", "A")]
    assert rows[3][1:3] == ["**93.56**", "±0.75"]  # the best, in bold
    assert rows[1][1].startswith("**")  # SAM's (run A), the reference, in bold
    assert rows[13][1] == "72.00"  # GSAM, run B: neither the best nor SAM, not bold


def test_variants_spread_reads_sams_time_across_runs():
    assert "1.90× in run A, 1.94× in run B" in tool.variants_spread(variant_runs())


def test_a_variants_run_without_its_method_is_refused():
    with pytest.raises(ValueError, match="run C has no 'everyk'"):
        tool.render_variants_table(variant_runs(drop=("C", "everyk")))


# -- the ρ sweep ---------------------------------------------------------------------------------------


def sweep_fixture():
    factors = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    sam = (0.729, 0.762, 0.844, 0.918, 0.125, 0.096, 0.096)
    rows = [{"optimizer": "sgd", "factor": None, "rho": None, "seeds": 3, "accuracy_mean": 0.711,
             "accuracy_std": 0.01, "accuracy_ci95": 0.02}]
    rows += [{"optimizer": "sam", "factor": f, "rho": 0.3 * f, "seeds": 3, "accuracy_mean": a, "accuracy_std": 0.01,
              "accuracy_ci95": 0.31 if f == 2.0 else 0.015} for f, a in zip(factors, sam)]
    methods = {"sam": {"best_accuracy": 0.918, "best_rho": 0.3, "worst_accuracy": 0.096, "worst_rho": 1.2,
                       "spread": 0.822}}
    return {"config": {"seeds": 3, "first_seed": 0, "threads": 1, "model": "mlp"}, "factors": list(factors),
            "rows": rows, "methods": methods, "wall_seconds": 300.0}


def test_sweep_table_rows():
    lines = tool.render_sweep_table(sweep_fixture()).splitlines()
    assert lines[0] == "| method (ρ×1) | ρ×⅛ | ρ×¼ | ρ×½ | ρ×1 | ρ×2 | ρ×4 | ρ×8 | best (ρ) | spread |"
    assert lines[2] == "| SGD (no ρ) | 71.1 |  |  |  |  |  |  |  |  |"
    assert lines[3] == "| SAM (0.3) | 72.9 | 76.2 | 84.4 | 91.8 | 12.5 | 9.6 | 9.6 | 91.8 (0.3) | 82.2 |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_sweep_block_copies_its_figure_next_to_the_readme(tmp_path):
    run = tmp_path / "runs" / "rho-sweep"
    run.mkdir(parents=True)
    (run / "sweep.json").write_text(json.dumps(sweep_fixture()))
    (run / "sweep.png").write_bytes(b"png")
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(valid_readme())
    status = tool.main(["--readme", str(readme), "--only", "rho-sweep", "--from", str(tmp_path / "runs")],
                       print_fn=lambda _: None)
    assert status == 0
    assert (tmp_path / "docs" / "rho_sweep.png").read_bytes() == b"png"
    text = " ".join(readme.read_text().split())
    assert "±1.5 points in the median cell and up to ±31.0" in text and "5.0 min" in text


# -- the step benchmark ----------------------------------------------------------------------------------


def bench_fixture(name, tensors, params, medians, floor, bandwidth):
    methods = {}
    for key, ms in medians.items():
        methods[key] = {"median_ms": ms, "x_floor": ms / floor, "samples_ms": [0.97 * ms] * 15 + [1.03 * ms] * 15,
                        "speedup_vs_per_tensor": medians["per_tensor"] / ms if "per_tensor" in medians else None}
    result = {"name": name, "tensors": tensors, "params": params, "floor_ms": floor, "methods": methods,
              "copy": {"gb_per_s": bandwidth}}
    return {"meta": {"torch": "2.15.0", "sharpness": "0.1.0", "python": "3.11.7", "cpus": 2, "torch_threads": 2,
                     "args": {"reps": 10, "steps": 3, "seed": 0}}, "results": [result]}


def test_speed_table_rows_and_spread():
    benches = [bench_fixture("resnet18", 62, 11_689_512,
                             {"per_tensor": 22.4, "foreach": 17.6, "flat_fused": 13.4, "sharpness": 15.5}, 12.8, 45.0),
               bench_fixture("transformer(d=128, 24 blocks)", 290, 4_800_000, {"sharpness": 8.0}, 5.3, 38.0)]
    lines = tool.render_speed_table(benches).splitlines()
    assert lines[2] == ("| ResNet-18 (62 tensors, 11.7M params) | 22.4 ms | 17.6 ms | 13.4 ms | "
                        "**15.5 ms (1.21× floor, 1.45× faster than `sam.py`)** | 12.8 ms |")
    assert lines[3] == ("| transformer d=128, 24 blocks (290 tensors, 4.8M params) | — | — | — | **8.0 ms (1.51× floor)** "
                        "| 5.3 ms |")
    spread = tool.speed_spread(benches)
    assert spread.startswith("Medians of 30 timed steps per method; copy bandwidth 38–45 GB/s")
    assert spread.endswith("sharpness's own steps spread up to ±3% around its median (10th–90th percentile).")


# -- efficient SAM and the finder ---------------------------------------------------------------------


def efficient_rows():
    rows = []
    deltas = {"sam": (-0.030, 0.00124, 0.00174, 0.153), "msam": (-0.015, 0.009, 0.0091, 0.155)}
    for method, values in deltas.items():
        for i, delta in enumerate(values):
            rows.append({"pair": f"p{i}", "base": "sgd", "noise": 0.4, "method": method, "rho": 0.1 + 0.7 * i,
                         "seeds": 3, "delta": delta, "delta_std": 0.005 * (i + 1), "stalled": int(i == 3 and method == "sam"),
                         "time_ratio": 1.8 if method == "sam" else 0.96})
    return rows


def test_efficient_table_takes_the_median_of_the_printed_cells():
    lines = tool.render_efficient_table(efficient_rows()).splitlines()
    assert lines[0] == "| method | Δ acc: worst | median | best | stalled runs (of 12) | time/epoch |"
    # SAM's middle cells print as +0.1 and +0.2 (0.124 and 0.174 pp): the median of the printed cells is
    # +0.2, as the bench's Δ matrix reads; the median of the raw values (0.149 pp) would print +0.1
    assert lines[2] == "| SAM (ρ from the sweep) | −3.0 | +0.2 | +15.3 | 1 | 1.80× |"
    assert lines[3] == "| **`MomentumSAM(..., rho)`** (its own ρ from the sweep: 0.1–2.2) | −1.5 | +0.9 | +15.5 | 0 | **0.96×** |"


def test_efficient_spread_leaves_stalled_settings_out_of_its_maximum():
    assert tool.efficient_spread(efficient_rows()) == (
        "Δ is paired over 3 seeds per setting; the standard deviation of a setting's Δ over its seeds, the spread a "
        "rerun should expect, is ±1.2 pp in the median setting and up to ±2.0 pp where no run stalled.")


def test_finder_text_from_its_rows():
    rows = [{"pair": "digits_mlp", "base": "sgd", "noise": 0.4, "method": "sam", "finder_rho": 0.1, "gap": 0.054,
             "step_fraction": 0.2, "time_fraction": 0.56},
            {"pair": "digits_cnn", "base": "sgd", "noise": 0.0, "method": "sam", "finder_rho": 0.2, "gap": 0.0,
             "step_fraction": 0.1, "time_fraction": 0.05},
            {"pair": "digits_cnn", "base": "sgd", "noise": 0.0, "method": "msam", "finder_rho": 1.0, "gap": 0.009,
             "step_fraction": 0.1, "time_fraction": 0.07}]
    runs = [{"stage": "sweep", "pair": "digits_mlp", "base": "sgd", "noise": 0.4, "method": "sam", "rho": 0.1,
             "stalled": False},
            {"stage": "finder", "pair": "digits_cnn", "base": "sgd", "noise": 0.0, "method": "msam", "rho": 1.0000000001,
             "stalled": True},
            {"stage": "sweep", "pair": "digits_cnn", "base": "sgd", "noise": 0.0, "method": "sam", "rho": 0.46,
             "stalled": True}]  # not at a pick: does not count
    settings = {"pairs": ["digits_mlp", "digits_cnn"], "bases": ["sgd"], "noises": [0.0, 0.4],
                "sam_grid": [0.01, 0.1, 1.0], "sweep_seeds": 3}
    text = tool.render_finder_text(rows, runs, settings)
    assert text.startswith("Against a full sweep (3 radii × 3 seeds) on the two model/data pairs below, one base, both "
                           "noise levels")
    assert "the finder's pick collapsed 1 of 2 runs" in text
    assert "within 2.7 pp of the sweep's best in the median setting for SAM (0.9 pp for Momentum-SAM)" in text
    assert "5.4 pp at worst (the MLP on noisy labels, where SAM's best radius sits right at the cliff" in text
    assert "at most 20% of one run's steps (wall time up to 0.56× of one training run, 0.07× in the median" in text


# -- running -----------------------------------------------------------------------------------------


def test_a_run_records_its_command_and_versions(tmp_path, monkeypatch):
    code = "import pathlib, sys; pathlib.Path(sys.argv[-1], 'out.json').write_text('{}')"
    monkeypatch.setitem(tool.RUNS, "demo", tool.Run(f'python -c "{code}"', "out.json", 0.01))
    tool.execute("demo", tmp_path / "demo", print_fn=lambda _: None)
    record = json.loads((tmp_path / "demo" / tool.RUN_RECORD).read_text())
    assert record["command"] == tool.RUNS["demo"].command and record["seconds"] > 0
    assert record["numpy"] and record["python"] and record["date"]


def test_a_failed_run_leaves_the_readme_unchanged(tmp_path, monkeypatch):
    monkeypatch.setitem(tool.RUNS, "demo", tool.Run("python -c 'import sys; sys.exit(3)'", "results.json", 0.01))
    readme = tmp_path / "README.md"
    readme.write_text(valid_readme())
    before = readme.read_text()
    with pytest.raises(SystemExit, match="exit status 3"):
        tool.main(["--readme", str(readme), "--only", "demo", "--work", str(tmp_path / "runs")], print_fn=lambda _: None)
    assert readme.read_text() == before


def test_unknown_block_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        tool.main(["--only", "tables", "--check"])
    assert "unknown block tables" in capsys.readouterr().err


# -- bench_step.py --methods -------------------------------------------------------------------------


def test_bench_step_refuses_an_unknown_method_with_a_usage_error():
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_step.py"), "--methods", "7"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "argument --methods: unknown method 7: choose a comma-separated list of 1, 2, 3, 4, 4b, 5" in done.stderr
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr


def test_bench_step_method_list():
    bench_step = _load("bench_step_methods", ROOT / "benches" / "bench_step.py")
    assert bench_step.method_list(" 1, 4B ,5") == "1,4b,5"
    assert tuple(bench_step.METHODS) == bench_step.METHOD_KEYS  # every key has its class
    for bad, message in (("6", "the floor, always runs"), ("1,1", "listed twice"), (",", "unknown method")):
        with pytest.raises(Exception, match=message):
            bench_step.method_list(bad)


def test_a_missing_figure_leaves_the_readme_unchanged(tmp_path):
    run = tmp_path / "runs" / "rho-sweep"
    run.mkdir(parents=True)
    (run / "sweep.json").write_text(json.dumps(sweep_fixture()))  # no sweep.png
    readme = tmp_path / "README.md"
    readme.write_text(valid_readme())
    with pytest.raises(SystemExit, match="missing figure"):
        tool.main(["--readme", str(readme), "--only", "rho-sweep", "--from", str(tmp_path / "runs")], print_fn=lambda _: None)
    assert readme.read_text() == valid_readme()
