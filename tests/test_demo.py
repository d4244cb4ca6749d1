"""`make demo`'s pipeline on a tiny budget, so it cannot rot."""

import csv
import json

from dynvit.run import demo


def test_demo_pipeline_trains_prunes_and_reports(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path / "demo"), "--quick"])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"Results are in {out.resolve()}"
    assert (out / "teacher/checkpoints/last.ckpt").is_file()
    assert (out / "prune/keep_ratio_0.7/checkpoints/last.ckpt").is_file()
    assert list((out / "prune/keep_ratio_0.7/kept_tokens").glob("*.png"))
    rows = list(csv.DictReader((out / "benchmark/results.csv").open()))
    assert [r["method"] for r in rows][0] == "teacher" and len(rows) == 6
    data = json.loads((out / "benchmark/results.json").read_text())
    assert data["environment"]["batch_size"] == 8 and data["environment"]["torch"]
    results = data["rows"]
    gflops = [r["gflops"] for r in results]
    assert gflops == sorted(gflops, reverse=True)  # teacher, then ρ = 0.9 … 0.5
    assert (out / "benchmark/tradeoff.png").stat().st_size > 0
    # The second run trains nothing: the teacher and the finished sweep point are reused.
    before = (out / "prune/keep_ratio_0.7/checkpoints/last.ckpt").stat().st_mtime
    demo.main(["--out", str(tmp_path / "demo"), "--quick"])
    assert (out / "prune/keep_ratio_0.7/checkpoints/last.ckpt").stat().st_mtime == before
