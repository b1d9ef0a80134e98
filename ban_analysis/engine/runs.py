"""The run folder: the only thing analysis reads.

The layout itself (every path and column) is :mod:`ban_analysis.layout`; this module writes it,
through the atomic writes of :mod:`ban_analysis.engine.files` (a kill at any moment leaves the old
file or the new one; a full disk is a one-line :class:`RunFolderError`). While a process trains
into a folder it holds the folder's lock (:func:`folder_lock`), so a second process on the same
folder is refused instead of interleaving its files with the first one's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

# the file primitives live in files.py; importable from here as before (cli, chain, study, tests use them)
from ban_analysis.engine.files import (  # noqa: F401
    RunFolderError, atomic_save_npy, atomic_save_npz, atomic_write_bytes, atomic_write_json, folder_lock, now,
    read_json, sha256_file, write_error,
)
from ban_analysis.layout import METRIC_COLUMNS, OPTIONAL_METRIC_COLUMNS, RunLayout

logger = logging.getLogger(__name__)



def git_commit() -> str:
    """The commit of the ban_analysis checkout this code runs from (+'-dirty'), or 'unknown'."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    import ban_analysis
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "ban_analysis": ban_analysis.__version__}


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _with_defaults(stored: dict) -> dict:
    """A stored config.json with every key added since it was written filled with its default, so a
    run folder written by an older version resumes when its config is otherwise the same."""
    from ban_analysis.config import ConfigError, RunConfig, build_section

    try:
        return json.loads(json.dumps(build_section(RunConfig, stored).to_dict()))
    except (ConfigError, TypeError, ValueError):
        return stored  # a key this version does not know: compared as stored (and refused)


class RunDir:
    """One run folder: config, manifest, per-generation files, and the hook writer's output."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout = RunLayout(self.path)

    # ---- config and manifest -------------------------------------------------------------
    def check_config(self, config: Mapping[str, Any]) -> bool:
        """True if this folder holds a run of exactly ``config`` (resume); False if it is new.

        Raises RunFolderError for a folder with another config or foreign content. Writes nothing,
        so a run that fails before training (missing data, say) leaves no half-made folder.
        """
        cfg_path = self.layout.config
        if cfg_path.exists():
            diff = _diff_keys(_with_defaults(read_json(cfg_path)), json.loads(json.dumps(config)))
            # the [log] section changes no number: a resume may turn TensorBoard on or off
            diff = [k for k in diff if k != "log" and not k.startswith("log.")]
            if diff:
                raise RunFolderError(
                    f"{self.path} holds a run with a different config (differs in: {', '.join(diff[:5])}); "
                    "use another --out folder or the original config")
            return True
        if self.path.exists() and any(p.name != self.layout.lock.name for p in self.path.iterdir()):
            raise RunFolderError(f"{self.path} exists, is not empty and holds no config.json; "
                                 "choose an empty or new --out folder")
        return False

    def lock(self):
        """Context manager: hold this folder's lock (:func:`folder_lock`) while a process trains into it."""
        return folder_lock(self.layout.lock, self.path)

    def bind_config(self, config: Mapping[str, Any]) -> bool:
        """Check (see :meth:`check_config`) and write config.json if new. Returns True if resuming."""
        if self.check_config(config):
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.layout.config, json.loads(json.dumps(config)))
        return False

    def manifest(self) -> dict:
        path = self.layout.manifest
        return read_json(path) if path.exists() else {}

    def update_manifest(self, **fields_: Any) -> dict:
        manifest = self.manifest()
        for key, value in fields_.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        atomic_write_json(self.layout.manifest, manifest)
        return manifest

    def start_manifest(self, seed: int, device: str) -> None:
        manifest = self.manifest()
        fields_ = {"seed": seed, "device": device, "git_commit": git_commit(),
                   "versions": package_versions(), "command": " ".join(sys.argv)}
        if "started" not in manifest:
            fields_["started"] = now()
        else:  # a resume: keep the first start, record this one
            fields_["resumed"] = manifest.get("resumed", []) + [now()]
        self.update_manifest(**fields_)

    # ---- generations -----------------------------------------------------------------------
    def gen_dir(self, gen: int) -> Path:
        return self.layout.gen_dir(gen)

    def checkpoint_path(self, gen: int) -> Path:
        return self.layout.checkpoint(gen)

    def save_checkpoint(self, gen: int, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_path(gen), buf.getvalue())

    def load_checkpoint(self, gen: int | None = None, path: Path | None = None) -> dict:
        path = Path(path) if path is not None else self.checkpoint_path(gen)
        return load_checkpoint_file(path)

    def write_metrics(self, gen: int, rows: list[dict]) -> None:
        buf = io.StringIO()
        # the fixed columns always; an optional column only when every row has it
        columns = list(METRIC_COLUMNS) + [c for c in OPTIONAL_METRIC_COLUMNS if rows and all(c in r for r in rows)]
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
        atomic_write_bytes(self.layout.metrics(gen), buf.getvalue().encode())

    def save_logits(self, gen: int, split: str, logits: torch.Tensor, best: bool = False) -> None:
        """The last epoch's logits, or with ``best`` the best-validation epoch's."""
        path = self.layout.best_logits(gen, split) if best else self.layout.logits(gen, split)
        atomic_save_npy(path, logits.detach().float().cpu().numpy())

    def load_logits(self, gen: int, split: str = "test", best: bool = False) -> np.ndarray:
        path = self.layout.best_logits(gen, split) if best else self.layout.logits(gen, split)
        if not path.exists():
            raise RunFolderError(f"{path} is missing")
        return np.load(path)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.layout.summary, summary)

    def summary(self) -> dict:
        return read_json(self.layout.summary)

    def is_complete(self) -> bool:
        return self.layout.summary.exists() and "finished" in self.manifest()

    # ---- hook output -------------------------------------------------------------------------
    def hook_file(self, gen: int, hook: str, epoch: int) -> Path:
        return self.layout.hook_file(gen, hook, epoch)


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint with weights_only=True; a damaged file gives one clear error."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise RunFolderError(f"checkpoint {path} is corrupt or not a ban_analysis checkpoint "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                             "delete it to retrain that generation") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunFolderError(f"checkpoint {path} holds no 'model' state; not a ban_analysis checkpoint")
    return state


class HookWriter:
    """Buffers hook outputs in memory and writes one Parquet file per hook and epoch.

    Rows arrive as {hook: {column: tensor}} per step; per-sample columns are (B',) tensors and
    per-step values are 0-d tensors (broadcast to one row). A 1-d ``step`` column (the rows of many
    steps at once, from ``HookRunner.flush``) gives each row its own step instead of the ``step``
    argument. The epoch's file is written at epoch end, before the epoch's checkpoint, so a crash
    loses at most this epoch and resume rewrites it.
    """

    def __init__(self, run: RunDir, gen: int):
        self.run, self.gen = run, gen
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {}

    def add(self, epoch: int, step: int, outputs: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for hook, columns in outputs.items():
            if not columns:
                continue
            # (.numpy() straight away where it can: a per-step row has ~25 columns, and each call
            # costs a few us inside a training step here)
            arrays = {name: (t.numpy() if t.device.type == "cpu" and not t.requires_grad else t.detach().cpu().numpy())
                      for name, t in columns.items()}
            steps = arrays.pop("step", None)
            n_rows = max((a.shape[0] for a in arrays.values() if a.ndim == 1), default=1)
            if n_rows == 0:
                continue
            block = {"gen": np.full(n_rows, self.gen, np.int32), "epoch": np.full(n_rows, epoch, np.int32),
                     "step": (np.full(n_rows, step if steps is None else steps, np.int64)
                              if steps is None or steps.ndim == 0 else steps.astype(np.int64, copy=False))}
            for name, a in arrays.items():
                block[name] = (a.reshape(1) if n_rows == 1 else np.broadcast_to(a, (n_rows,))) if a.ndim == 0 else a
            self._buffers.setdefault(hook, []).append(block)

    def flush(self, epoch: int, means: bool = False) -> dict[str, dict[str, float]]:
        """Write the epoch's files; with ``means``, return {hook: {column: mean over the epoch's rows}}
        of every floating-point or boolean column (integer columns are ids and labels: left out)."""
        import pandas as pd

        out = {}
        for hook, blocks in self._buffers.items():
            frame = pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False, compression="zstd")
            atomic_write_bytes(self.run.hook_file(self.gen, hook, epoch), buf.getvalue())
            if means:
                numeric = frame.select_dtypes(include=["floating", "bool"])
                out[hook] = {name: float(value) for name, value in numeric.mean().items()}
        self._buffers.clear()
        return out

