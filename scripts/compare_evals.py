"""Compare evaluation runs of scripts/eval_gso.py on the same objects: one Markdown table, as in docs/reproduction.md.

    python scripts/compare_evals.py "no 2D prior=eval/noprior" "no refinement=eval/norefine" "full=eval/full"

Each argument is LABEL=OUTPUT_FOLDER. Only objects that every run evaluated successfully are compared, so the rows
are paired; the last run is the reference for the "better than" counts (per object, for each metric, in its own
direction: higher PSNR / SSIM / F-score / consistency, lower LPIPS / Chamfer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# metric -> (column label, higher is better)
METRICS = {
    "psnr": ("PSNR", True), "ssim": ("SSIM", True), "lpips": ("LPIPS", False), "chamfer": ("Chamfer", False),
    "fscore": ("F-score", True), "normal_consistency": ("NC", True), "mv_psnr": ("MV consistency PSNR", True),
}


def load_run(folder: Path) -> dict[str, dict]:
    """Object name -> metrics of the objects a run evaluated successfully."""
    files = sorted((folder / "objects").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no objects/*.json (not an eval_gso.py output folder?)")
    records = [json.loads(f.read_text()) for f in files]
    return {r["name"]: r["metrics"] for r in records if r.get("status") == "ok"}


def compare(runs: dict[str, dict[str, dict]]) -> str:
    """The Markdown table: mean of each metric over the shared objects, and per-object wins against the last run."""
    names = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not names:
        raise ValueError("the runs share no successfully evaluated object")
    reference = list(runs)[-1]
    metrics = [m for m in METRICS if all(isinstance(runs[reference][n].get(m), (int, float)) for n in names)]
    lines = [f"{len(names)} objects evaluated by every run; means, and in brackets on how many objects a run does "
             f"better than **{reference}**", "",
             "| run | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, run in runs.items():
        cells = []
        for m in metrics:
            values = np.array([run[n][m] for n in names], dtype=np.float64)
            cell = f"{values.mean():.4g}"
            if label != reference:
                ref = np.array([runs[reference][n][m] for n in names], dtype=np.float64)
                better = (values > ref) if METRICS[m][1] else (values < ref)
                cell += f" ({int(better.sum())})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER", help="eval_gso.py output folders; the last is the reference")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            p.error(f"{spec!r}: expected LABEL=FOLDER")
        try:
            runs[label] = load_run(Path(folder))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(compare(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
