"""scripts/compare_evals.py: paired means over the shared objects and per-object wins in each metric's direction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_weights import load_script

compare_evals = load_script("compare_evals")


def write_run(folder: Path, objects: dict[str, dict | None]) -> Path:
    (folder / "objects").mkdir(parents=True)
    for name, metrics in objects.items():
        record = {"name": name, "status": "ok", "metrics": metrics} if metrics else {"name": name, "status": "failed"}
        (folder / "objects" / f"{name}.json").write_text(json.dumps(record))
    return folder


def test_paired_means_and_wins(tmp_path, capsys):
    a = write_run(tmp_path / "a", {"x": {"psnr": 20.0, "chamfer": 1.0, "lpips": "unavailable"},
                                   "y": {"psnr": 10.0, "chamfer": 3.0, "lpips": "unavailable"},
                                   "z": {"psnr": 99.0, "chamfer": 0.0, "lpips": "unavailable"}})  # z: not in b
    b = write_run(tmp_path / "b", {"x": {"psnr": 15.0, "chamfer": 2.0, "lpips": "unavailable"},
                                   "y": {"psnr": 12.0, "chamfer": 1.0, "lpips": "unavailable"}, "z": None})
    assert compare_evals.main([f"A={a}", f"B={b}"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("2 objects evaluated by every run")
    assert "| run | PSNR | Chamfer |" in table  # LPIPS unavailable: left out
    assert "| A | 15 (1) | 2 (1) |" in table  # x: higher PSNR and lower Chamfer than B; y: neither
    assert "| B | 13.5 | 1.5 |" in table


def test_bad_arguments(tmp_path):
    assert compare_evals.main([f"A={tmp_path}"]) == 2  # no objects/
    with pytest.raises(SystemExit):
        compare_evals.main(["no-label-folder"])
