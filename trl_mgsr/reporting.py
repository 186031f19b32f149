"""Writing a demo's results: `results.json` (every figure) and `results.md` (the printed table)."""

from __future__ import annotations

import json
import os


def save_results(output_dir: str, results: dict, table: str, student_dir: str, log) -> None:
    """Write `results.json` and `results.md` (the table) and say where the MGSR student is (both demos)."""
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    log(f"Distilled student (MGSR) saved with its model card to {student_dir}")
