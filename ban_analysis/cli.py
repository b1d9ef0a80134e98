"""The ``ban-analysis`` command: run, show, study, report.

User mistakes (bad config, wrong folder, missing data) and what blocks a run from outside (its
folder in use by another process, a full disk) end with one line on stderr and exit
code 2; a diverged run ends with its diagnosis and exit code 3; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
EXIT_DISTRIBUTED = 4  # under torchrun: another rank failed, or a collective timed out


def _torchrun_rank() -> int | None:
    """This process's rank when torchrun started it with WORLD_SIZE > 1, else None (read from the
    environment, so the CLI stays torch-free until a command needs torch)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return int(os.environ.get("RANK", "0") or 0) if world > 1 else None
    except ValueError:
        return None


def _is_collective_failure(err: BaseException) -> bool:
    """A torch.distributed error: the peer closed the connection, a timeout, a backend failure."""
    dist_error = getattr(getattr(sys.modules.get("torch"), "distributed", None), "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    return any(k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                   "timeout", "processgroup", "c10d"))


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


def _log_overrides(args) -> list[str]:
    """``--set`` values, plus ``log.tensorboard=true`` for ``--tensorboard``."""
    return list(args.set) + (["log.tensorboard=true"] if getattr(args, "tensorboard", False) else [])


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
    cfg = config_from_dict(table, _log_overrides(args))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    try:
        summary = run_chain(cfg, out, device=args.device, progress=not args.quiet)
    finally:
        from ban_analysis.engine.distributed import shutdown

        shutdown()  # under torchrun: leave the process group; else nothing
    if _torchrun_rank() in (None, 0):  # under torchrun, rank 0 prints
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

    if _torchrun_rank() is not None:
        raise ValueError("study does not run under torchrun (every rank would train every run); "
                         "use --executor ray for many GPUs, or torchrun with `ban-analysis run`")
    if args.executor != "ray" and (args.cpus_per_run is not None or args.gpus_per_run is not None):
        raise ValueError("--cpus-per-run and --gpus-per-run apply to --executor ray only")
    results = run_study(args.config, args.out, executor=args.executor, address=args.address,
                        workers=args.workers, device=args.device, overrides=_log_overrides(args),
                        progress=not args.quiet, cpus_per_run=args.cpus_per_run,
                        gpus_per_run=args.gpus_per_run)
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
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files under <out>/tensorboard/ (log.tensorboard)")
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
    p.add_argument("--cpus-per-run", type=float, default=None, metavar="N",
                   help="Ray: CPUs reserved per task, also its torch threads (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=None, metavar="F",
                   help="Ray: GPUs reserved per task; a fraction (0.5) lets runs share a GPU "
                        "(default 1 with --device cuda, else 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the study's base run config, e.g. train.epochs=3")
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard event files in every run folder: tensorboard --logdir <out>")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="statistics, figures and verdicts for a study folder")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = _torchrun_rank()  # under torchrun the other ranks log warnings and errors only
    logging.basicConfig(level=logging.INFO if rank in (None, 0) else logging.WARNING,
                        format="%(message)s" if rank is None else f"[rank {rank}] %(message)s", stream=sys.stderr)
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
    except RuntimeError as err:  # a collective failed: a peer rank died, or BAN_DDP_TIMEOUT passed
        if rank is None or args.debug or not _is_collective_failure(err):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        _emit(f"ban-analysis: rank {rank}: training stopped: another rank failed or a collective timed out "
              f"({type(err).__name__}: {first}); rerun the same command to resume", sys.stderr)
        return EXIT_DISTRIBUTED
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, json.JSONDecodeError) as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        _emit(f"ban-analysis: error: {message}", sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a full disk met outside the run folder's writer (the data cache, ...)
        if args.debug or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _emit(f"ban-analysis: error: could not write {err.filename or 'a file'}: no space left on device "
              "(disk full?); free space and rerun the same command to resume", sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
