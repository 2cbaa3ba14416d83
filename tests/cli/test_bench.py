"""``siguard bench`` and the benchmark runner's report writers (no timing asserts: speed is measured only
in benchmarks/)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.cli.test_cli import ROOT, _assert_one_line_error, siguard


def _runner():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def plan_dir(mlp_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "plan"
    siguard("compile", mlp_onnx, "-o", d, "--batch", "2", check=True)
    return d


def test_bench_prints_the_breakdown_and_writes_json(plan_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = siguard("bench", plan_dir, "--repeat", "2", "--json", out, check=True)
    assert "query (threads, median of 2 warm)" in proc.stdout
    doc = json.loads(out.read_text())
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert len(doc["seconds_all"]) == 2 and doc["seconds"] > 0
    assert sum(r["steps"] for r in doc["breakdown"]) == len(plan["steps"])
    assert doc["rounds"] == plan["totals"]["rounds"]  # measured rounds == the plan's cost model
    for row in doc["breakdown"]:
        assert row["op"] in proc.stdout


def test_bench_rejects_bad_arguments(plan_dir, tmp_path):
    assert "--repeat" in _assert_one_line_error(siguard("bench", plan_dir, "--repeat", "0"))
    _assert_one_line_error(siguard("bench", tmp_path / "missing"))


def _doc():
    row = {"model": "resnet34", "batch": 1, "guard": "off", "mode": "threads", "seconds": 2.0, "rounds": 445,
           "bytes_per_party": [110e6, 94e6, 94e6], "peak_rss_mb": {"process": 900.0}, "ort_ms": 50.0,
           "crypten": {"seconds": 8.0, "rounds": 335, "bytes_per_party": [806e6, 806e6]},
           "vs_crypten": {"time": 0.25, "bytes": 110 / 806, "rounds": 445 / 335},
           "breakdown": [{"op": "conv", "impl": "auto", "steps": 36, "seconds": 1.0, "share": 0.5, "rounds": 36,
                          "bytes": 8e6}]}
    meta = {"date": "2026-11-28", "machine": "Linux x86_64", "cpus": 2, "python": "3.11", "torch": "2.13",
            "onnxruntime": "1.x", "siguard": "0.1", "crypten": "0.4.1", "repeat": 3}
    return {"meta": meta, "rows": [row], "guard_shares": [], "paper": {}}


def test_markdown_table_has_the_ratios_and_versions():
    md = _runner().markdown(_doc())
    assert "| resnet34 | 1 | off | threads | 2.000 | 445 | 110.00 |" in md
    assert "0.25 / 0.14 / 1.33" in md
    assert "2026-11-28" in md and "torch 2.13" in md and "CrypTen 0.4.1" in md


def test_readme_table_goes_between_the_markers_only(tmp_path):
    run = _runner()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nbefore\n{run.BEGIN}\nold table\n{run.END}\nafter\n")
    run.update_readme(_doc(), readme)
    text = readme.read_text()
    assert text.startswith("# Title\nbefore\n") and text.endswith(f"{run.END}\nafter\n")
    assert "old table" not in text and "| resnet34 | 1 | off | threads |" in text
    run.update_readme(_doc(), readme)  # idempotent
    assert readme.read_text() == text


def test_readme_without_markers_fails_clearly(tmp_path):
    run = _runner()
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="perf-table:begin"):
        run.update_readme(_doc(), readme)
    assert readme.read_text() == "# no markers\n"


def test_the_documented_runner_command_lines_parse():
    """Every ``python benchmarks/run.py ...`` line the READMEs quote is accepted by the runner's parser, with the
    values it shows (a renamed flag or a dropped mode fails here, not in a reader's shell)."""
    import shlex

    parser = _runner().build_parser()
    lines = []
    for doc in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        for line in doc.read_text().splitlines():
            if "python benchmarks/run.py" in line and "`python benchmarks/run.py …" not in line:
                cmd = line.split("python benchmarks/run.py", 1)[1].split("#", 1)[0].split("`", 1)[0]
                if "…" not in cmd:
                    lines.append(shlex.split(cmd))
    assert len(lines) >= 5, lines
    for argv in lines:
        args = parser.parse_args(argv)  # SystemExit (with argparse's message) on an unknown flag or value
        if "--modes" in argv:
            i = argv.index("--modes") + 1
            shown = [a for a in argv[i:] if not a.startswith("--")][: len(args.modes)]
            assert args.modes == shown


def test_alternated_runs_pool_their_warm_queries():
    """--runs K: each child run's warm query times are pooled and the median is taken over all of them (one
    slow run cannot set the number); an error in any run is reported, not hidden."""
    pool = _runner()._pool
    a = {"seconds": 1.0, "seconds_all": [1.0, 1.2, 0.9], "rounds": 391}
    b = {"seconds": 2.0, "seconds_all": [2.0, 2.1, 1.9], "rounds": 391}
    c = {"seconds": 1.1, "seconds_all": [1.1, 1.05, 1.15], "rounds": 391}
    acc = pool(pool(pool(None, a), b), c)
    assert acc["runs"] == 3 and len(acc["seconds_all"]) == 9
    assert acc["seconds"] == sorted(a["seconds_all"] + b["seconds_all"] + c["seconds_all"])[4] == 1.15
    assert pool(acc, {"error": "child failed"})["error"] == "child failed"
    assert pool(pool(None, {"error": "child failed"}), a)["error"] == "child failed"
