"""The ``ban-analysis`` command: run, show, study, report.

User mistakes (bad config, wrong folder, missing data) end with one line on stderr and exit
code 2; a diverged run ends with its diagnosis and exit code 3; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def _emit(text: str, stream=None) -> None:
    """The command's own output (tables, paths) on stdout, errors on stderr; progress and
    diagnostics go through ``logging``. The CLI is the one module that writes to the terminal."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _hooks_override(table: dict, hooks: str | None) -> dict:
    """``--hooks a,b`` keeps those hooks (with their config options if any); ``--hooks none`` drops all."""
    if hooks is None:
        return table
    names = [h.strip() for h in hooks.split(",") if h.strip() and h.strip() != "none"]
    old = table.get("hooks", {})
    return {**table, "hooks": {name: old.get(name, {}) for name in names}}


def _format_table(summary: dict) -> str:
    def pct(x):
        return "   -  " if x is None else f"{100 * x:6.2f}"

    lines = ["gen  objective  arch              val_acc  test_acc  test_nll  test_ece"]
    for g in summary["generations"]:
        lines.append(f"{g['gen']:>3}  {g['objective']:<9}  {g['arch']:<16}  {pct(g['val_acc'])}   "
                     f"{pct(g['test_acc'])}    {g['test_nll']:.4f}    {pct(g['test_ece'])}")
    if summary.get("ensembles"):
        lines.append("")
        lines.append("ensemble of gens   test_acc  test_nll  test_ece  agree_w_teacher")
        for e in summary["ensembles"]:
            members = "+".join(str(m) for m in e["members"])
            lines.append(f"{members:<17}   {pct(e['test_acc'])}    {e['test_nll']:.4f}    "
                         f"{pct(e['test_ece'])}    {pct(e['agreement_with_teacher'])}")
    lines.append("(accuracies and ECE in %" + (", test metrics over the classes the test split holds"
                                               if summary.get("test_scoring") == "present_classes" else "") + ")")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


def cmd_run(args) -> int:
    from ban_analysis.config import config_from_dict, read_toml
    from ban_analysis.engine.chain import run_chain

    table = _hooks_override(read_toml(args.config), args.hooks)
    cfg = config_from_dict(table, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run_chain(cfg, out, device=args.device, progress=not args.quiet)
    _emit(_format_table(summary))
    _emit(f"run folder: {out}")
    return 0


def cmd_show(args) -> int:
    from ban_analysis.engine.runs import RunDir, RunFolderError

    run = RunDir(args.run_dir)
    if not run.layout.config.exists():
        raise RunFolderError(f"{run.path} is not a run folder (no config.json)")
    if not run.layout.summary.exists():
        gens = sorted(p.name for p in run.path.glob("gen-*"))
        raise RunFolderError(f"{run.path} is not finished yet (has {', '.join(gens) or 'no generations'}); "
                             "rerun its command to resume")
    _emit(_format_table(run.summary()))
    return 0


def cmd_study(args) -> int:
    from ban_analysis.layout import StudyLayout
    from ban_analysis.study import run_study

    results = run_study(args.config, args.out, executor=args.executor, address=args.address,
                        workers=args.workers, device=args.device, overrides=args.set,
                        progress=not args.quiet)
    _emit(f"{len(results)} result rows in {StudyLayout(args.out).results}")
    return 0


def cmd_report(args) -> int:
    from ban_analysis.report import write_report

    path = write_report(args.study_dir, command=" ".join(["ban-analysis"] + sys.argv[1:]))
    _emit(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ban-analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a teacher and its born-again generations")
    p.add_argument("config", help="TOML run config (see experiments/)")
    p.add_argument("--out", help="run folder (default runs/<config name>); rerun to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--hooks", help="comma-separated hooks to run instead of the config's ('none' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("show", help="print a run folder's table of generations and ensembles")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("study", help="seeds x objectives x generations, paired by seed")
    p.add_argument("config", help="TOML study config")
    p.add_argument("--out", required=True, help="study folder; rerun to resume")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--workers", type=int, default=None, help="parallel Ray tasks (default: CPU count)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the study's base run config, e.g. train.epochs=3")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="statistics, figures and verdicts for a study folder")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ban_analysis.engine.step import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as err:
        if args.debug:
            raise
        _emit(f"ban-analysis: training stopped: {err}", sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        _emit("ban-analysis: interrupted; rerun the same command to resume", sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, json.JSONDecodeError) as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        _emit(f"ban-analysis: error: {message}", sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
