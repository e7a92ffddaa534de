"""fdiv-align-report's rows from run directories: the base row from a steps=0 run, the target-p row
pooled over the runs that aim at p itself (not at a floored p_ε)."""

import json
import math

from fdiv_align.report import export_runs, load_run, load_runs, tables, target_row


def _final(alignments, texts, kl_a, entropy):
    return {"alignment": 0.5, "kl_pi_a": 1.0, "entropy": 10.0, "target_kl_a": kl_a, "target_entropy": entropy,
            "qrs_proposed": 10, "qrs_accepted": len(texts), "qrs_tv_bound": 0.01,
            "qrs_samples": {"texts": texts, "contexts": [""] * len(texts), "alignment": alignments}}


def _write(root, name, steps, divergence, floor, final, base=None, seed=0):
    run = root / name
    run.mkdir(parents=True)
    summary = {"task": "t", "divergence": divergence, "steps": steps, "seed": seed, "lora": True, "base": base,
               "final": final, "config": {"divergence": {"log_phi_floor": floor}, "trainer": {"lr": 1e-3}}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("")
    return run


def test_base_row_from_the_steps0_run_and_target_row_pooled_over_unfloored_runs(tmp_path):
    base = {"alignment": 0.125, "kl_pi_a": 0.0, "entropy": 9.0}
    _write(tmp_path, "base", 0, "rkl", -10.0, base, base=base)
    _write(tmp_path, "fkl0", 5, "fkl", None, _final([1.0, 0.0, 1.0], ["a b", "c d", "a b"], 2.0, 7.0))
    _write(tmp_path, "js0", 5, "js", None, _final([1.0], ["e f"], 4.0, 9.0), seed=0)
    _write(tmp_path, "rkl0", 5, "rkl", -10.0, _final([0.0] * 5, ["z"] * 5, 0.0, 1.0))  # aims at p_ε: left out
    runs = [load_run(p.parent) for p in sorted(tmp_path.rglob("summary.json"))]
    text = tables(runs)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"divergence", "base (untuned)", "target p", "fkl", "js", "rkl"}  # no row for the steps=0 run
    assert "0.125" in rows["base (untuned)"]
    target = target_row([r for r in runs if r["summary"]["steps"] > 0])
    pooled = [1.0, 0.0, 1.0, 1.0]  # fkl's and js's accepted samples, not rkl's
    mean = sum(pooled) / 4
    se = math.sqrt(sum((a - mean) ** 2 for a in pooled) / 3 / 4)
    assert target["alignment"] == mean and target["cells"]["alignment"] == f"{mean:.3f} ± {se:.3f}"
    assert target["kl_a"] == 3.0 and target["cells"]["entropy"] == "8.000 ± 1.000"
    assert "4 of 20 proposals accepted" in target["description"] and "p_ε" in target["description"]
    only_floored = target_row([r for r in runs if r["summary"]["divergence"] == "rkl" and r["summary"]["steps"] > 0])
    assert only_floored["alignment"] == 0.0 and "this is p_ε" in only_floored["description"]
    assert target_row([load_run(_write(tmp_path, "plain", 5, "tv", None, {"alignment": 0.1}))]) is None  # no QRS


def test_separable_cells_need_a_difference_beyond_two_standard_errors():
    from fdiv_align.report import separable_cells

    # a: mean 1.0, se 0.0058; b: mean 1.1, se 0.0058 → Δ = 0.1 > 2·0.0082: both separable; c: one seed → never
    values = {"a": [0.99, 1.0, 1.01], "b": [1.09, 1.1, 1.11], "c": [5.0], "d": [1.0, 1.1, 1.2]}
    assert separable_cells(values) == {"a", "b"}  # d (se 0.058) is within 2 s.e. of both
    assert separable_cells({"a": [0.99, 1.0, 1.01], "b": [1.0, 1.01, 1.02]}) == set()  # Δ 0.01 < 2·0.0082
    assert separable_cells({"a": [1.0, float("inf")], "b": [0.0, 0.1]}) == set()  # an infinite value: no claim


def test_the_compact_runs_file_gives_the_same_tables_as_the_run_directories(tmp_path):
    base = {"alignment": 0.125, "kl_pi_a": 0.0, "entropy": 9.0}
    _write(tmp_path / "sweep", "base", 0, "rkl", -10.0, base, base=base)
    _write(tmp_path / "sweep", "fkl0", 5, "fkl", None, _final([1.0, 0.0, 1.0], ["a b", "c d", "a b"], 2.0, 7.0))
    _write(tmp_path / "sweep", "fkl1", 5, "fkl", None, _final([0.0], ["e f"], 4.0, 9.0), seed=1)
    (tmp_path / "sweep" / "fkl1" / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "alignment": 0.5}) + "\n")
    from_dirs = load_runs([str(tmp_path / "sweep")])
    export_runs(from_dirs, tmp_path / "runs.jsonl")
    from_file = load_runs([str(tmp_path / "runs.jsonl")])
    assert [r["dir"].name for r in from_file] == ["base", "fkl0", "fkl1"] and from_file[2]["evals"][0]["alignment"] == 0.5
    assert tables(from_file) == tables(from_dirs) and "fkl" in tables(from_file)
