"""hessext.bench on tiny sizes (CPU, fast): JSON schema, wrong methods flagged and not timed,
missing optional peers skipped with a note, plots written as PNG, the command line."""

import builtins
import json

import pytest
import torch

from hessext import bench

TINY = dict(architectures=[[3, 5, 2]], batches=[6], min_run_time=0.002, progress=False)


def test_report_schema_and_checks():
    report = bench.run(["hvp", "diagonal", "laplacian"], methods=["hessext", "torch.func", "double-backward"], **TINY)
    assert set(report) == {"environment", "dtype", "k", "cases", "notes"}
    assert {"date", "device", "torch", "cuda", "threads", "python", "git_commit", "hessext_native"} <= set(
        report["environment"]
    )
    assert report["dtype"] == "float64"
    assert [c["quantity"] for c in report["cases"]] == ["hvp", "diagonal", "laplacian"]
    for case in report["cases"]:
        assert {"quantity", "widths", "batch", "P", "gradient_s", "methods"} <= set(case)
        hx = case["methods"]["hessext"]
        assert hx["status"] == "ok" and hx["rel_error"] < 1e-10 and hx["median_s"] > 0 and hx["x_hessext"] == 1.0
        assert {"median_s", "iqr_s", "peak_mb", "x_gradient", "x_hessext", "rel_error"} <= set(hx)
    assert report["cases"][1]["methods"]["double-backward"]["status"] == "skipped"
    json.dumps(report)  # JSON-ready


def test_wrong_method_is_flagged_not_timed():
    def doubled(pb):
        return lambda: {n: 2 * t for n, t in bench.builders()["hvp"]["hessext"](pb)().items()}

    report = bench.run(["hvp"], methods=["hessext"], extra_methods={"hvp": {"broken": doubled}}, **TINY)
    entry = report["cases"][0]["methods"]["broken"]
    assert entry["status"] == "wrong" and "median_s" not in entry and entry["rel_error"] > 0.5
    assert any("broken is wrong" in n for n in report["notes"])


def test_missing_peers_are_skipped_with_a_note(monkeypatch):
    real_import = builtins.__import__

    def no_peers(name, *args, **kwargs):
        if name.split(".")[0] in ("backpack", "curvlinops"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    report = bench.run(["diagonal", "hvp"], methods=["hessext", "backpack", "curvlinops"], **TINY)
    diag = report["cases"][0]["methods"]
    assert diag["backpack"]["status"] == "skipped" and "BackPACK not installed" in diag["backpack"]["note"]
    assert report["cases"][1]["methods"]["curvlinops"]["status"] == "skipped"
    assert any("BackPACK not installed" in n for n in report["notes"])


def test_plot_is_a_png_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png, md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    bench.main(
        [
            "--quantities",
            "hvp",
            "--widths",
            "2,3,1",
            "--widths",
            "2,6,1",
            "--batch",
            "4,8",
            "--methods",
            "hessext,double-backward",
            "--min-run-time",
            "0.002",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--md",
            str(md),
        ]
    )
    report = json.loads(out.read_text())
    assert len(report["cases"]) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text().count("| hvp |") == 8
    assert "double-backward" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--quantities", "nonsense"])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "magic"])


def test_float32_tolerance():
    report = bench.run(["hvp"], methods=["hessext"], dtype=torch.float32, **TINY)
    entry = report["cases"][0]["methods"]["hessext"]
    assert entry["status"] == "ok" and entry["rel_error"] < 1e-3


def test_cli_defaults_shown_nothing_written_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "(default: 0.5)" in capsys.readouterr().out
    bench.main(
        ["--quantities", "hvp", "--widths", "2,3,1", "--batch", "4", "--methods", "hessext", "--min-run-time", "0.002"]
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("widths", ["3", "2,0,1", "a,b"])
def test_cli_refuses_architectures_without_parameters(widths, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--widths", widths])
    assert "--widths" in capsys.readouterr().err


def test_peak_memory_is_the_methods_own():
    """A method that holds 64 MB at its peak reports about that, whatever the process held before."""
    import torch

    from hessext.bench import cpu_peak_mb

    hold = torch.ones(2**24, dtype=torch.float64)  # 128 MB the process already holds
    peak = cpu_peak_mb(lambda: torch.ones(2**23, dtype=torch.float64).sum())
    if peak is None:
        pytest.skip("this kernel does not allow resetting the peak (/proc/self/clear_refs)")
    assert 60 <= peak <= 100, peak
    del hold


def test_markdown_cells_stay_on_one_line():
    report = {
        "environment": {"date": "d", "device": "cpu", "threads": 2, "torch": "t", "git_commit": "c"},
        "dtype": "float64",
        "notes": ["a\nmulti-line | note"],
        "cases": [
            {
                "quantity": "hvp",
                "widths": [1, 2],
                "batch": 3,
                "methods": {"x": {"status": "failed", "note": "Error: one\n  two | three"}},
            }
        ],
    }
    md = bench.markdown(report)
    assert "| hvp | 1,2 | 3 | x | n/a | |  | Error: one two \\| three |" in md
    assert "- a multi-line \\| note" in md


def test_jax_peer_checked_and_timed_in_its_own_process():
    pytest.importorskip("jax")
    pytest.importorskip("folx")
    quantities = ["hvp", "hvp-batched", "ggn_vp", "diagonal", "hessian", "input-hessian", "laplacian"]
    report = bench.run(quantities, methods=["hessext", "jax"], **TINY)
    for case in report["cases"]:
        jx = case["methods"]["jax"]
        assert jx["status"] == "ok", (case["quantity"], jx)
        assert jx["rel_error"] < 1e-10 and jx["median_s"] > 0 and jx["compile_s"] > 0  # float64 agreement


def test_jax_peer_missing_or_failing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    entry = bench.run(["hvp"], methods=["hessext", "jax"], **TINY)["cases"][0]["methods"]["jax"]
    assert entry["status"] == "skipped" and "JAX not installed" in entry["note"]
    broken = {"hvp": {"external": lambda pb: bench.External("hessext.no_such_peer", {"x": pb.x.numpy()})}}
    entry = bench.run(["hvp"], methods=["hessext"], extra_methods=broken, **TINY)["cases"][0]["methods"]["external"]
    assert entry["status"] == "failed" and "no_such_peer" in entry["note"]


def test_a_failing_peer_leaves_no_forward_ad_level_behind():
    """A peer that fails inside forward-mode AD (as torch.compile of a jvp can) must not break the
    later cases, whose references use nested jvp."""

    def leaks(pb):
        def run():
            torch.autograd.forward_ad.enter_dual_level()
            raise RuntimeError("failed while tracing")

        return run

    report = bench.run(
        ["laplacian", "laplacian"], methods=["hessext"], extra_methods={"laplacian": {"leaky": leaks}}, **TINY
    )
    assert [c["methods"]["leaky"]["status"] for c in report["cases"]] == ["failed", "failed"]
    assert all(c["methods"]["hessext"]["status"] == "ok" for c in report["cases"])
