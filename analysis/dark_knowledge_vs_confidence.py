"""Do the probes (by default CWTM's confidence weighting, DKPP's permuted dark knowledge) explain the reference's gains?

Reads a study folder (written by `ban-analysis study`), runs the library's attribution analysis,
and prints the rule-derived answer with the comparisons it rests on, then the split of the
reference's gain into the parts of the teacher's signal. Which variant is the reference and which
are probes comes from the study's roles (study.json; defaults: reference "ban", probes "cwtm",
"dkpp"). All logic lives in ban_analysis.report; this script only chooses what to show.

    python analysis/dark_knowledge_vs_confidence.py STUDY_DIR [--out answer.json] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ban_analysis.report import attribute, load_study, to_jsonable

QUESTION = ("Do the probes explain the reference's gain over its teacher: the teacher's confidence as a sample "
            "weight, or the dark knowledge in its non-target probabilities?")


def _shown(result):
    """Family A rows of the reference and probes, family B rows reference vs probe; the probes' fractions."""
    roles, comps, fractions = result.roles, result.comparisons, result.fractions
    asked = [roles.get("reference"), *roles.get("probes", [])]
    if len(comps):
        keep = [(f == "A" and a in asked) or (f == "B" and b in roles.get("probes", []))
                for f, a, b in zip(comps["family"], comps["a"], comps["b"])]
        comps = comps[keep]
    if len(fractions):
        fractions = fractions[fractions["probe"].isin(roles.get("probes", []))]
    return comps, fractions


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
    shown, fractions = _shown(result)
    print(QUESTION)
    print(f"roles: {result.roles}")
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
    print("\nwhich part of the teacher's signal carries the gain (fraction of the reference's gain):")
    for row in result.components.get("rows", []):
        print(f"  {row['component']:<15} {row['label']:<16} {row['estimate']:.2f} "
              f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]  -> {row['verdict_kind']}")
    if args.out is not None:
        payload = {"question": QUESTION, "study": str(args.study_dir), "roles": result.roles, "answer": result.answer,
                   "notes": result.notes, "margin_points": result.margin, "threshold": result.threshold,
                   "comparisons": shown, "gain_fractions": fractions, "components": result.components}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
