"""Does CWTM confidence weighting or DKPP's permuted dark knowledge explain BAN students' gains?

Reads a study folder (written by `ban-analysis study`), runs the library's attribution analysis,
and prints the rule-derived answer with the comparisons it rests on. All logic lives in
ban_analysis.report; this script only chooses what to show.

    python analysis/dark_knowledge_vs_confidence.py STUDY_DIR [--out answer.json] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ban_analysis.report import attribute, load_study
from ban_analysis.report import to_jsonable

QUESTION = "Does CWTM weighting or DKPP permutation explain the students' gains over their teachers?"
SHOWN = {("A", "BAN vs teacher"), ("A", "CWTM vs teacher"), ("A", "DKPP vs teacher"), ("B", "BAN vs CWTM"),
         ("B", "BAN vs DKPP")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="study folder (study.json, results.csv, runs/)")
    parser.add_argument("--out", type=Path, default=None, help="also write the answer and its numbers as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap generator (default 0)")
    args = parser.parse_args(argv)
    try:
        result = attribute(load_study(args.study_dir), seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    comps = result.comparisons
    shown = comps[[(f, c) in SHOWN for f, c in zip(comps["family"], comps["comparison"])]] if len(comps) else comps
    fractions = result.fractions[result.fractions["probe"].isin(["cwtm", "dkpp"])] if len(result.fractions) else result.fractions

    print(QUESTION)
    print()
    print(result.answer["headline"])
    for sentence in result.answer["sentences"]:
        print(f"  - {sentence}")
    for note in result.notes:
        print(f"  note: {note}")
    print()
    print(f"n = {result.matrix.shape[0]} seeds; accuracy points; margin ±{result.margin:.2f}; "
          f"gain-fraction threshold {result.threshold}")
    for row in shown.to_dict("records"):
        print(f"  [{row['family']}] {row['comparison']:<16} {row['mean_diff']:+.2f} "
              f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]  Holm p {row['p_holm']:.3g}  "
              f"TOST Holm p {row['p_tost_holm']:.3g}  MDE {row['mde']:.2f}  -> {row['verdict_kind']}")
    for row in fractions.to_dict("records"):
        print(f"  fraction {row['probe']:<5} {row['estimate']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
              f"  -> {row['verdict_kind']}")
    if args.out is not None:
        payload = {"question": QUESTION, "study": str(args.study_dir), "answer": result.answer,
                   "notes": result.notes, "margin_points": result.margin, "threshold": result.threshold,
                   "comparisons": shown, "gain_fractions": fractions}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
