"""``pgasr report`` (``make bench``) end to end on a tiny budget: JSON, PNGs and Markdown."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from pgasr.config import ConfigError, load_config
from pgasr.report import (LADDER, build_tables, ladder_steps, load_bench_config, main,
                          render_markdown)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "configs" / "bench.yaml"
TINY_MODEL = ["model.channels=[8,8,16,16]", "model.n_z=16", "model.decoder_channels=16",
              "model.window_size=4", "model.num_heads=2", "model.dat_depth=1",
              "model.disc_channels=8", "model.codebook_size=32"]


def tiny_overrides(tmp: Path) -> list[str]:
    return [
        f"synth.out_dir={tmp}/synth", "synth.subjects=4", "synth.slices=16",
        f"data.prepared_dir={tmp}/prepared", f"prior.cache_dir={tmp}/prior_cache",
        f"run_dir={tmp}/runs", "data.slices_per_volume=8", "data.train_subjects=2",
        "data.val_subjects=1", "data.test_subjects=1", "data.scales=[2]",
        "stage1.epochs=1", "stage1.max_steps=3", "stage1.batch_size=4", "stage1.crop=32",
        "stage2.epochs=1", "stage2.max_steps=2", "stage2.batch_size=4", "stage2.crop=32",
        *TINY_MODEL,
        "bench.seeds=[0]", "bench.scales=[2]", "bench.baseline_max_seconds=2",
        "bench.figure_slices=2", f"bench.out_dir={tmp}/bench", f"bench.report={tmp}/results.md",
        f"bench.collect_dir={ROOT}/benchmarks/results",
        "tracking.mlflow=false",  # tracked runs are tests/test_tracking.py's (MLflow costs seconds)
    ]


def test_bench_config_loads_and_rejects_unknown_keys(tmp_path):
    cfg, bench = load_bench_config(BENCH)
    assert bench.scales == [2, 4] and set(bench.scales) <= set(cfg.data.scales)
    assert bench.rows == [k for k, *_ in LADDER]
    with pytest.raises(ConfigError, match="bench.nope"):
        load_bench_config(BENCH, ["bench.nope=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_bench_config(BENCH, ["stage2.nope=1"])
    with pytest.raises(ConfigError, match="not in data.scales"):
        load_bench_config(BENCH, ["data.scales=[2]", "bench.scales=[4]"])
    assert load_config(BENCH).name == "bench"  # a plain RunConfig, like every shipped config
    assert (bench.out_dir, bench.report) == ("benchmarks/results/bench", "docs/results.md")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_end_to_end_tiny(tmp_path):
    sets = [a for o in tiny_overrides(tmp_path) for a in ("--set", o)]
    assert main(["--config", str(BENCH), *sets]) == 0

    out = tmp_path / "bench"
    res = json.loads((out / "results.json").read_text())
    kinds = [(r["kind"], r.get("row")) for r in res["runs"]]
    assert ("stage1", None) in kinds and ("cnn", None) in kinds
    assert {row for k, row in kinds if k == "stage2"} == {k for k, *_ in LADDER}
    for r in res["runs"]:
        assert r["seconds"] > 0 and r["per_subject"]
    t1 = res["tables"]["table1"]["2"]
    assert set(t1) == {"Bicubic", "Residual CNN (same budget)",
                       "Stage-1 reconstruction (upper bound)", "PGASR"}
    assert t1["PGASR"]["psnr"]["mean"] is not None
    for name in t1:  # every Table-1 row splits SSIM into head and background
        assert 0 < t1[name]["ssim_head"]["mean"] <= 1 and 0 < t1[name]["ssim_bg"]["mean"] <= 1
    assert set(res["tables"]["table3"]["2"]) == {"with", "without"}
    for png in ("fig1_codes.png", "fig4_x2.png"):
        assert (out / png).stat().st_size > 1000, png
    assert res["collected"]["serve"].get("headline")

    md = (tmp_path / "results.md").read_text()
    for text in ("## Table 1 — x2", "| Bicubic |", "| Residual CNN (same budget) |",
                 "| Stage-1 reconstruction (upper bound) |", "| PGASR |", "36.7642",
                 "## Table 2 — ablation ladder, x2", "| Exp 0 |", "| Ours (+SCAB) |",
                 "## Table 3", "w/o L_align_d", "fig1_codes.png", "fig4_x2.png",
                 "## Discussion", "### serve", "SSIM background", "inside the head"):
        assert text in md, text
    # the Markdown is a pure function of results.json
    assert render_markdown(res, tmp_path / "results.md", out) == md
    assert all(r["worker"].endswith(f":{os.getpid()}") for r in res["runs"])  # in process
    assert not any("ckpt" in r for r in res["runs"])  # no machine-local paths in the JSON
    # --render-only re-derives the tables from the per-run records (older JSON lacks newer ones)
    del res["tables"]["ladder_steps"]
    (out / "results.json").write_text(json.dumps(res))
    assert main(["--config", str(BENCH), "--render-only", *sets]) == 0
    assert "ladder_steps" in json.loads((out / "results.json").read_text())["tables"]
    assert "One change at a time, x2" in (tmp_path / "results.md").read_text()


def _run(row, seed, psnr_by_subject):
    return {"kind": "stage2", "scale": 2, "row": row, "seed": seed, "seconds": 1.0,
            "per_subject": {s: {"psnr": v} for s, v in psnr_by_subject.items()}}


def test_ladder_steps_pair_by_seed_and_judge_against_the_seed_spread():
    runs = []
    for seed, noise in enumerate((0.0, 0.8, -0.8)):  # seed effects far larger than the steps
        base = 20.0 + noise
        runs += [_run("exp0", seed, {"a": base, "b": base + 1}),
                 _run("exp1", seed, {"a": base + 0.3, "b": base + 1.3}),    # +0.3 every seed
                 _run("exp2", seed, {"a": base + 0.3 + (0.2, -0.1, 0.05)[seed],
                                     "b": base + 1.3})]                     # mixed signs
    steps = {(s["from"], s["to"]): s for s in ladder_steps(runs, 2)}
    assert set(steps) == {("exp0", "exp1"), ("exp1", "exp2")}  # only steps with both rows
    up = steps[("exp0", "exp1")]
    assert up["per_seed"] == pytest.approx([0.3] * 3) and up["std"] == pytest.approx(0, abs=1e-9)
    assert up["verdict"] == "helps" and up["paper"] == pytest.approx(35.942 - 34.487)
    mixed = steps[("exp1", "exp2")]
    assert mixed["per_seed"] == pytest.approx([0.1, -0.05, 0.025])
    assert mixed["verdict"] == "within seed spread"
    # the same +0.3 step, reversed, hurts; with one seed there is no spread to judge by
    flipped = [dict(r, row={"exp0": "exp1", "exp1": "exp0"}.get(r["row"], r["row"])) for r in runs]
    assert {s["to"]: s["verdict"] for s in ladder_steps(flipped, 2)}["exp1"] == "hurts"
    base = [r for r in runs if r["row"] == "exp0"]
    tiny = base + [dict(r, row="exp1", per_subject={s: {"psnr": m["psnr"] + 0.01}
                                                   for s, m in r["per_subject"].items()})
                   for r in base]
    # consistent but tiny (+0.01 dB on every seed): not called a help
    assert ladder_steps(tiny, 2)[0]["verdict"].startswith("negligible")
    one = ladder_steps([r for r in runs if r["seed"] == 0], 2)
    assert {s["verdict"] for s in one} == {"one seed: no spread to judge by"}
    # build_tables carries the steps per scale
    tables = build_tables({"runs": runs, "bench": {"scales": [2]}})
    assert [s["to"] for s in tables["ladder_steps"][2]] == ["exp1", "exp2"]


def test_cli_report_subcommand_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pgasr.cli", "report", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--render-only" in r.stdout and "--quick" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_job_runs_every_unit_as_a_ray_task(ray_session, tmp_path):
    """jobs/bench.py: the same bench, each training run a Ray task, results in the same JSON."""
    from jobs.bench import build_parser, main as job_main

    sets = tiny_overrides(tmp_path) + ["bench.seeds=[0,1]", "bench.rows=[exp0,ours]"]
    args = build_parser().parse_args(["--config", str(BENCH),
                                      *[a for o in sets for a in ("--set", o)]])
    assert job_main(args) == 0

    out = tmp_path / "bench"
    res = json.loads((out / "results.json").read_text())
    got = sorted((r["kind"], r["seed"], r.get("row") or r.get("acg"), r.get("scale"))
                 for r in res["runs"])
    want = sorted([("stage1", s, acg, None) for s in (0, 1) for acg in (True, False)]
                  + [("stage2", s, row, 2) for s in (0, 1) for row in ("exp0", "ours")]
                  + [("cnn", s, None, 2) for s in (0, 1)])
    assert got == want
    hosts = {r["worker"].rsplit(":", 1)[0] for r in res["runs"]}
    pids = {r["worker"].rsplit(":", 1)[1] for r in res["runs"]}
    assert hosts == {platform.node()} and str(os.getpid()) not in pids  # ran in Ray workers
    for s in (0, 1):
        for d in ("stage1_acg0", "stage1_acg1", "x2/exp0", "x2/ours"):
            assert (tmp_path / "runs" / f"seed{s}" / d / "ckpt").is_dir(), (s, d)
    t2 = res["tables"]["table2"]["2"]
    assert set(t2) == {"exp0", "ours"} and t2["ours"]["psnr"]["seeds"] == 2
    assert res["tables"]["table1"]["2"]["PGASR"]["psnr"]["mean"] is not None
    assert (out / "fig4_x2.png").stat().st_size > 1000  # Fig. 4 rows came back from a task
    assert "## Table 1" in (tmp_path / "results.md").read_text()
    # priors came from the Ray priors job (actor pool), not from the driver
    meta = json.loads((tmp_path / "prepared_priors" / "priors.json").read_text())
    assert "source_fingerprint" in meta and meta.get("writer") != "pgasr.report.compute_priors"
