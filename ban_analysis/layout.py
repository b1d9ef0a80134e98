"""The on-disk layout of run and study folders: every path, file name, column list and shared constant.

Torch-free on purpose: the engine's writer, the study's planner and collector, the report's
loader and the test fixtures all build their paths here, so a layout change is one edit in one
file and a test (``tests/test_layout.py``) catches drift between writer and reader.

A run folder::

    <run>/config.json            the resolved RunConfig
    <run>/manifest.json          seed, git commit, versions, device, times, sha256 per gen
    <run>/summary.json           per-generation and ensemble test metrics (fractions in [0, 1])
    <run>/run.lock               held while a process trains into the folder
    <run>/val_targets.npy, test_targets.npy    int64 labels
    <run>/label_noise.npz        with label noise: the clean labels and which were flipped
    <run>/gen-<k>/checkpoint.pt  model + optimizer + RNG state, written atomically
    <run>/gen-<k>/metrics.csv    one row per epoch (METRIC_COLUMNS, then optional columns)
    <run>/gen-<k>/val_logits.npy, test_logits.npy   float32 (N, C), the last epoch's model
    <run>/gen-<k>/best_val_logits.npy, best_test_logits.npy   the best-validation epoch's (train.track_best)
    <run>/gen-<k>/hooks/<hook>/epoch-<e>.parquet     what the hooks returned, one file per epoch
    <run>/tensorboard/gen-<k>/   TensorBoard event files (optional)

A study folder::

    <study>/study.json           the resolved study config
    <study>/results.csv          one row per (seed, variant, gen or ensemble): RESULT_COLUMNS
    <study>/study.lock           held while a process runs the study
    <study>/runs/seed-<s>/teacher/       generation 0 on labels, one per seed
    <study>/runs/seed-<s>/<variant>/     gen-0 = that teacher (imported), gens 1..K
    <study>/report/              index.md, report.html, stats.json, figures/*.png
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "DEFAULT_GAIN_FRACTION_THRESHOLD", "DEFAULT_MARGIN", "HOOK_KEYS", "METRIC_COLUMNS", "OPTIONAL_METRIC_COLUMNS",
    "RESULT_COLUMNS", "RunLayout", "StudyLayout", "TEACHER",
]

# The seed's generation-0 run in a study, and the teacher's column in every seed matrix.
TEACHER = "teacher"
# Study-config defaults (the study config states them; the loader falls back on these).
DEFAULT_MARGIN = 0.005  # accuracy fraction: +-0.5 points, fixed before the runs (TOST)
DEFAULT_GAIN_FRACTION_THRESHOLD = 0.5
# metrics.csv: these columns always, in this order; optional ones follow when a run has them.
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
OPTIONAL_METRIC_COLUMNS = ("train_acc_clean", "memorised", "skipped_steps", "test_acc", "eval_seconds")
# results.csv of a study. "objective" holds the variant's name (the run folder's name).
RESULT_COLUMNS = ("seed", "objective", "gen", "kind", "members", "test_acc", "test_nll", "test_ece", "val_acc")
# Every hook Parquet file has these columns first.
HOOK_KEYS = ("gen", "epoch", "step")

_GEN_DIR = re.compile(r"gen-(\d+)$")
_SEED_DIR = re.compile(r"seed-(-?\d+)$")


class RunLayout:
    """Paths of one run folder (nothing is read or written here)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    manifest = property(lambda self: self.path / "manifest.json")
    summary = property(lambda self: self.path / "summary.json")
    lock = property(lambda self: self.path / "run.lock")
    label_noise = property(lambda self: self.path / "label_noise.npz")

    def targets(self, split: str) -> Path:
        return self.path / f"{split}_targets.npy"

    def gen_dir(self, gen: int) -> Path:
        return self.path / f"gen-{gen}"

    def checkpoint(self, gen: int) -> Path:
        return self.gen_dir(gen) / "checkpoint.pt"

    def metrics(self, gen: int) -> Path:
        return self.gen_dir(gen) / "metrics.csv"

    def logits(self, gen: int, split: str) -> Path:
        return self.gen_dir(gen) / f"{split}_logits.npy"

    def best_logits(self, gen: int, split: str) -> Path:
        """Logits of the generation's best-validation-accuracy epoch (``train.track_best``)."""
        return self.gen_dir(gen) / f"best_{split}_logits.npy"

    def hook_file(self, gen: int, hook: str, epoch: int) -> Path:
        return self.gen_dir(gen) / "hooks" / hook / f"epoch-{epoch}.parquet"

    def hook_files(self, hook: str) -> list[tuple[int, Path]]:
        """(gen, path) of every Parquet file of ``hook``, sorted by gen then epoch."""
        found = []
        for path in self.path.glob(f"gen-*/hooks/{hook}/epoch-*.parquet"):
            match = _GEN_DIR.match(path.parent.parent.parent.name)
            if match:
                found.append((int(match.group(1)), int(path.stem.split("-")[1]), path))
        return [(g, p) for g, _, p in sorted(found)]

    def tensorboard(self, gen: int) -> Path:
        return self.path / "tensorboard" / f"gen-{gen}"


class StudyLayout:
    """Paths of one study folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "study.json")
    results = property(lambda self: self.path / "results.csv")
    lock = property(lambda self: self.path / "study.lock")
    report = property(lambda self: self.path / "report")
    runs = property(lambda self: self.path / "runs")

    def seed_dir(self, seed: int) -> Path:
        return self.runs / f"seed-{seed}"

    def run(self, seed: int, variant: str) -> RunLayout:
        """The run folder of ``variant`` (or :data:`TEACHER`) for ``seed``."""
        return RunLayout(self.seed_dir(seed) / variant)

    def teacher_checkpoint(self, seed: int) -> Path:
        return self.run(seed, TEACHER).checkpoint(0)

    def seeds_on_disk(self) -> list[tuple[int, Path]]:
        """(seed, folder) of every runs/seed-<s>/ folder, by seed."""
        found = [(int(m.group(1)), p) for p in self.runs.glob("seed-*") if (m := _SEED_DIR.match(p.name))]
        return sorted(found)
