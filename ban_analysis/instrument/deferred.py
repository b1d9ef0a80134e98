"""Deferred per-sample hooks: keep each step's tensors, select the rows and compute the statistics later.

A deferred runner (``HookRunner(defer=True)``) hands each due step of a deferrable hook
(``logit_split``, ``head_split``) to :class:`DeferredRows`, which keeps the tensors the hook's
``gather`` returns by reference, and, once ``defer_bytes`` are held and at ``flush``, selects the
reported rows and calls the hook's ``compute`` once over many steps. The values are the per-step
ones up to float rounding (~1e-7 here, a small KL ~3e-6: the log-softmax of many rows runs another
kernel). The kept tensors must not change after their step: labels or ids refilled in place raise
at compute time (``train_step`` and the objectives make new tensors every step). ``head_split``
keeps the norm of each row's head input, not the (B, D) input; the forward hook on a module
captured at every step without copies (its head) stays registered from the epoch's first step to
``flush``, and is dropped after a model's first step where the logits are the head's own matmul:
the head's input is then read from their autograd graph (``HeadSplit._graph_input``).

:class:`LateRows` does the same for the fused hooks that defer their statistics past the backward
(``update_share``: its (P, 3) dots a step; ``param_split`` on a Linear model: its rows' layer inputs,
output gradients and G a_s; their columns at ``flush``, many steps in one pass): inside a training step
each small op costs several times its own time, and handing a step's rows to the run writer cost
~140 us of an update_share step (benchmarks/README.md, "Eighth pass").

Also here: the two pieces the per-step path shares with it, the fixed-subset row lookup
(:func:`member_rows`) and the label-noise columns (:func:`noise_columns`). Split from
``runner.py`` (the scheduling).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeferredRows", "LateRows", "MemberMasks", "member_rows", "noise_columns"]


def member_rows(member: Tensor, index: Tensor) -> Tensor:
    """(n,) positions in ``index`` whose sample id is marked in the bool ``member`` mask (same device).

    Ids past the mask's end are not members. A lookup, not ``torch.isin`` (which sorts: ~40x
    slower on CPU at a 128-row batch against a 5,000-id subset); numpy on CPU, where its per-op
    cost is a quarter of torch's at this size.
    """
    if index.device.type == "cpu":
        ids, mask = index.numpy(), member.numpy()
        inside = ids < mask.shape[0]
        keep = np.zeros(ids.shape[0], dtype=bool)
        keep[inside] = mask[ids[inside]]
        return torch.from_numpy(np.flatnonzero(keep))
    inside = index < member.numel()
    keep = torch.zeros_like(inside)
    keep[inside] = member[index[inside]]
    return keep.nonzero().squeeze(1)


class MemberMasks:
    """``(name, device)`` -> the (max subset id + 1,) bool mask, True at the ids of hook ``name``'s fixed
    subset, made once per device type (moved here from the runner)."""

    def __init__(self, hooks: dict) -> None:
        self.hooks, self._masks = hooks, {}

    def __call__(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        key = (name, torch.device(device).type)
        member = self._masks.get(key)
        if member is None:
            subset = self.hooks[name].subset.cpu()
            member = torch.zeros(int(subset.max()) + 1 if subset.numel() else 0, dtype=torch.bool)
            member[subset] = True
            self._masks[key] = member = member.to(device)
        return member


def noise_columns(clean_labels: Tensor, sample_index: Tensor, target: Tensor, student_logits: Tensor) -> dict:
    """``clean_target``, ``label_noisy`` and ``student_argmax`` of the given rows (same device).

    student_argmax says whether the student predicts the clean or the noisy label, per sample.
    """
    clean = clean_labels[sample_index]
    return {"clean_target": clean, "label_noisy": target != clean,
            "student_argmax": student_logits.detach().argmax(1)}


@dataclasses.dataclass(slots=True)
class _Batch:
    """One step's batch, shared by the deferred hooks due at the step: made once a step."""

    step: int
    sample_index: Tensor
    target: Tensor
    versions: tuple    # version counters of the batch's labels and ids at the step
    n: int             # rows of the batch
    noise: dict | None  # with label noise: target and student_logits for the noise columns


# A deferred hook's step is kept as a plain tuple (made at every training step): (the step's _Batch,
# gather()'s tensors by reference, the rows drawn at the step (sample_from "batch") or None (selected
# at compute time)).
_Waiting = tuple[_Batch, dict, "Tensor | None"]


def _plain_cpu(columns: dict[str, Tensor]) -> dict[str, Tensor]:
    """Columns without autograd history, on the CPU: what flush hands the run writer."""
    return {k: (v.detach() if v.requires_grad else v).cpu() for k, v in columns.items()}


class DeferredRows:
    """The waiting steps of the deferred hooks, and the columns computed from them, for one epoch.

    Args:
        hooks: the runner's name -> ``Resolved`` (read at compute time).
        defer_bytes: what one hook may hold before its waiting steps are computed and released.
        member_mask: (name, device) -> the (max id + 1,) bool mask of that hook's fixed subset there.
        clean_labels_on: device -> the clean labels by sample id there; None without label noise.
    """

    def __init__(self, hooks: dict, defer_bytes: int, member_mask: Callable[[str], Tensor],
                 clean_labels_on: Callable[[torch.device], Tensor | None] | None) -> None:
        self.hooks, self.defer_bytes = hooks, defer_bytes
        self._member_mask, self._clean_on = member_mask, clean_labels_on
        self.drop()

    def drop(self) -> None:
        """Forget every waiting step and computed column."""
        self.waiting: dict[str, list[_Waiting]] = {}
        self.computed: dict[str, list[dict[str, Tensor]]] = {}
        self.at: tuple[int, int] | None = None  # the (gen, epoch) of what is held
        self._held: dict[str, int] = {}
        self._step_bytes: dict[str, int] = {}  # bytes one step holds, per hook (counted at its first step)

    def names(self) -> list[str]:
        return sorted(set(self.waiting) | set(self.computed))

    def add_step(self, ctx, items) -> None:
        """Keep this step's tensors (references: no copy) for each ``(name, rows)`` in ``items``, the
        deferred hooks due at this step, ``rows`` drawn now or None; one record of the batch's ids
        and labels serves all of them (each line here runs at every training step)."""
        index, target = ctx.sample_index, ctx.target
        noise = None
        if self._clean_on is not None and self._clean_on(index.device) is not None:  # noise columns later
            noise = {"target": target, "student_logits": ctx.student_logits.detach()}
        # the batch's labels and ids are what a data loader of one's own might refill in place (the
        # logits and logit gradient are new tensors of each step's forward and objective)
        batch = _Batch(ctx.step, index, target, (target._version, index._version), index.shape[0], noise)
        self.at = (ctx.gen, ctx.epoch)
        held, waiting = self._held, self.waiting
        for name, rows in items:
            raw = self.hooks[name].hook.gather(ctx)
            if name not in waiting:  # the first step of the epoch: the same tensors every step, counted once
                waiting[name], held[name] = [], 0
                self._step_bytes[name] = sum(t.numel() * t.element_size() for t in
                                             (*raw.values(), index, *(noise.values() if noise else ())))
            waiting[name].append((batch, raw, rows))
            held[name] += self._step_bytes[name]
            if held[name] >= self.defer_bytes:
                self.compute(name)

    def compute(self, only: str | None = None) -> None:
        """Columns of the waiting steps (of hook ``only``, or all): one ``compute`` call per run of
        steps with the same keys; the step tensors are then released."""
        cats: dict = {}  # tensors several hooks keep (labels, logit gradient, ids): concatenated once
        for name in [only] if only is not None else list(self.waiting):
            waiting = self.waiting.pop(name, [])
            self._held.pop(name, None)
            first = 0
            keys_of = [tuple(raw) for _, raw, _ in waiting]
            while first < len(waiting):
                keys = keys_of[first]
                last = first + 1
                while last < len(waiting) and keys_of[last] == keys:
                    last += 1
                chunk = self._compute_group(name, waiting[first:last], cats)
                if chunk is not None:
                    self.computed.setdefault(name, []).append(chunk)
                first = last

    def columns(self) -> dict[str, dict[str, Tensor]]:
        """Every waiting step computed; hook -> column -> (N,) CPU tensor in step order. Then dropped."""
        self.compute()
        out = {name: chunks[0] if len(chunks) == 1 else {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
               for name, chunks in self.computed.items()}
        self.drop()
        return out

    def _compute_group(self, name: str, group: list[_Waiting], cats: dict) -> dict[str, Tensor] | None:
        batches = [b for b, _, _ in group]
        for b in batches:
            if (b.target._version, b.sample_index._version) != b.versions:
                raise RuntimeError(f"hook {name!r} (deferred): the labels or ids of step {b.step} were changed "
                                   "in place after the step; pass new tensors each step, or HookRunner(defer=False)")

        def cat(tensors: list[Tensor]) -> Tensor:
            key = tuple(map(id, tensors))  # the tensors are alive (kept by the group): ids are unique
            if key not in cats:
                cats[key] = torch.cat(tensors)
            return cats[key]

        index = cat([b.sample_index for b in batches])  # (N,) every batch row of the group
        device = index.device
        sizes = torch.tensor([b.n for b in batches], device=device)
        pos = self._selected(name, group, index)  # None: every row
        if pos is not None and pos.numel() == 0:
            return None

        def pick(t: Tensor) -> Tensor:
            return t if pos is None else t.index_select(0, pos)

        raw = {k: pick(cat([r[k] for _, r, _ in group])) for k in group[0][1]}
        raw["batch_size"] = pick(sizes.float().repeat_interleave(sizes))
        cols = self.hooks[name].hook.compute(raw)
        steps = torch.tensor([b.step for b in batches], dtype=torch.int64, device=device).repeat_interleave(sizes)
        out = {"step": pick(steps), "sample_index": pick(index), **cols}
        clean = None if self._clean_on is None else self._clean_on(device)
        if clean is not None:
            out.update(noise_columns(clean, out["sample_index"], pick(cat([b.noise["target"] for b in batches])),
                                     pick(cat([b.noise["student_logits"] for b in batches]))))
        return _plain_cpu(out)

    def _selected(self, name: str, group: list[_Waiting], index: Tensor) -> Tensor | None:
        """Positions in the group's concatenated batches of the rows hook ``name`` reports (None = all)."""
        r = self.hooks[name]
        if r.samples == "all":
            return None
        if r.sample_from == "train":
            return member_rows(self._member_mask(name, index.device), index)
        # rows drawn at each step: shifted to the group's rows
        rows_list, offsets, counts, offset = [], [], [], 0
        for b, _, rows in group:
            rows = torch.arange(b.n, device=index.device) if rows is None else rows
            rows_list.append(rows)
            offsets.append(offset)
            counts.append(rows.shape[0])
            offset += b.n
        shift = torch.tensor(offsets, device=index.device).repeat_interleave(torch.tensor(counts, device=index.device))
        return torch.cat(rows_list) + shift


class LateRows:
    """The steps of the deferred fused hooks (``Hook.defers_after_backward``: ``update_share``,
    ``param_split``) for one epoch: what each hook's ``keep_after_backward`` kept, and at :meth:`columns`
    its ``columns_of`` over the kept steps, with a ``step`` column first (and a per-sample hook's
    ``sample_index`` and label-noise columns as the runner's ``_finish`` made them at the step).
    Held until :meth:`columns` with no ``defer_bytes`` bound: a few tensors a step, rows only (by count,
    ~0.37 MB a param_split step of the quick MLP's 32 rows, ~3 MB an epoch)."""

    def __init__(self) -> None:
        self.drop()

    def drop(self) -> None:
        self.kept: dict[str, list[tuple[int, dict, dict]]] = {}
        self.at: tuple[int, int] | None = None  # the (gen, epoch) of what is held

    def add(self, name: str, ctx, kept: dict, extra: dict) -> None:
        """Hook ``name``'s share of step ``ctx.step``: ``kept`` for its columns (small tensors: a few per
        step, or a per-sample hook's reported rows), ``extra`` the columns the runner adds to its rows
        (``sample_index``, noise columns; {} for a per-step hook)."""
        self.at = (ctx.gen, ctx.epoch)
        self.kept.setdefault(name, []).append((ctx.step, kept, extra))

    def columns(self, hooks: dict) -> dict[str, dict[str, Tensor]]:
        """hook -> column -> CPU tensor over the kept steps, in step order; then dropped."""
        out = {}
        for name, steps in self.kept.items():
            cols = hooks[name].hook.columns_of([kept for _, kept, _ in steps])
            extras = [extra for _, _, extra in steps]
            counts = [next(iter(extra.values())).shape[0] if extra else 1 for extra in extras]
            step = torch.tensor([s for s, _, _ in steps], dtype=torch.int64).repeat_interleave(torch.tensor(counts))
            joined = {k: torch.cat([extra[k].reshape(-1) for extra in extras]) for k in extras[0]}
            index = {"sample_index": joined.pop("sample_index")} if "sample_index" in joined else {}
            out[name] = _plain_cpu({"step": step, **index, **cols, **joined})
        self.drop()
        return out
