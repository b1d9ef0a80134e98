"""``dkpp``: Dark Knowledge with Permuted Predictions, Furlanello et al. 2018, eq. 11.

Soft-target cross-entropy to the teacher's distribution with its argmax entry kept in place
and the other C - 1 entries permuted uniformly at random among the other classes,
independently for every sample and every call. No labels are used. The permutation keeps the
teacher's confidence, its non-target mass and that mass's entropy, but destroys which classes
the teacher found similar.

    p = softmax(t), r_s = p_s with entries off argmax_j p_js permuted by a fresh random pi_s
    L = (1/B) sum_s H(r_s, q_s)                   dL/dz_s = (q_s - r_s) / B

Ablation ``anchor="label"``: the teacher's max value is put at the label coordinate and the
remaining C - 1 values (including, when the teacher is wrong, its value at the label) are
permuted uniformly over the other classes.

Randomness comes only from the ``generator`` passed to the call; ``generator=None`` is refused.
The same generator state gives the same permutations (on CPU and with the torch-only path other
devices take). The permutation algorithm was replaced on 2026-12-01 (see
:func:`anchor_first_orders`; it was one int64 ``randint`` + row-wise ``argsort``): the
distribution is the same, but a given seed now draws other permutations, so DKPP runs from
before that date are not reproduced bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy

ANCHORS = ("argmax", "label")

# Sort keys are int32 while 31 - bits(C - 1) >= 21 random bits remain next to the column index
# (C <= 1024): numpy sorts int32 rows ~2.4x faster than int64 ones and the draw costs half.
_NARROW_MAX_INDEX_BITS = 10
# CPU tensors take numpy's faster argmax, row sort and small-array steps (same results as the
# torch path every other device takes; the tests compare the two with this set to False).
_NUMPY_ON_CPU = True


def row_argmax(probs: Tensor) -> Tensor:
    """(B,) int64 index of each row's first maximum (the DKPP anchor).

    Same result as ``torch.argmax(probs, dim=1)`` (first maximal index on ties; rows are
    finite, validation refuses NaN). On CPU numpy's SIMD argmax takes ~15 us for 128 x 1000
    float32 against ~225 us for torch.argmax and ~80 us for ``torch.max(dim=1)``, used
    elsewhere and below 64 classes, where the conversions would cost more than they save.
    """
    on_cpu = _NUMPY_ON_CPU and probs.device.type == "cpu" and probs.shape[-1] >= 64
    if on_cpu and probs.dtype in (torch.float32, torch.float64) and not probs.requires_grad:
        return torch.from_numpy(probs.numpy().argmax(axis=1)).to(torch.int64)
    return probs.max(dim=1).indices


def _sort_rows_(keys: Tensor) -> Tensor:
    """Sort each row of an integer (B, C) tensor ascending; in place on CPU.

    torch's CPU sort is a comparison sort over (value, index) pairs (~5 ms for 128 x 1000
    int64 keys here); numpy's in-place ``ndarray.sort`` of the values alone uses a SIMD
    (AVX2 / AVX-512) sort in numpy >= 2.0 (~0.24 ms for int32). Keys within a row are distinct,
    so every sort gives the same result. Other devices use ``torch.sort``.
    """
    if _NUMPY_ON_CPU and keys.device.type == "cpu":
        keys.numpy().sort(axis=1)
        return keys
    return keys.sort(dim=1).values


def _buffer_like(like: Tensor, spare: Tensor | None) -> Tensor:
    """A tensor shaped and typed like ``like`` in the memory of ``spare`` if that is big enough
    (contiguous, same device), else a new one. Contents undefined.

    Re-using memory that the caller allocates anyway saves a fresh 0.5 MB buffer at
    B = 128, C = 1000, whose first touch (page faults, cache misses) costs ~10% of the call.
    """
    nbytes = like.numel() * like.element_size()
    if (spare is None or not spare.is_contiguous() or spare.device != like.device
            or spare.numel() * spare.element_size() < nbytes):
        return torch.empty_like(like)
    if spare.shape == like.shape and spare.element_size() == like.element_size():
        return spare.view(like.dtype)  # the common case (float32 result, int32 keys): one view
    return spare.view(-1).view(torch.uint8)[:nbytes].view(like.dtype).view(like.shape)


def _shuffle_tied_runs_(keys: Tensor, bits: int, generator: torch.Generator, start: int = 0,
                        spare: Tensor | None = None) -> None:
    """Give each run of keys with equal random bits a uniformly random order, in place.

    ``keys`` (B, C), contiguous, are sorted ascending along each row from column ``start`` on
    and non-negative there; their bits above the low ``bits`` are random, the low ``bits`` hold
    the column index (so keys are distinct). A run is a maximal stretch of a row whose keys
    share the random bits: the sort ordered them by column index instead of at random. Each
    run's keys are put in a uniformly random order, independently across runs and rows, by
    ranks from one ``torch.randperm`` over all tied entries (whose restrictions to disjoint runs
    are independent uniform orders); keys within a run differ only in the column bits, so the
    rows stay sorted by random bits. Columns before ``start`` are left out. ``spare``: memory
    that may be overwritten as scratch (see :func:`_buffer_like`).

    Neighbours j, j+1 share the random bits iff ``keys[j] ^ keys[j+1] < 2^bits`` (non-negative
    keys), so finding the tied pairs is one xor, one comparison and one nonzero over the batch.
    Ties are rare (about B C^2 2^-22 tied pairs per batch with int32 keys: ~30 at B = 128,
    C = 1000, ~0.3 at C = 100), so the runs are assembled in Python from their few indices: a
    loop over tied pairs, not over samples (on CPU through numpy, whose calls cost a fraction
    of torch's).
    """
    C = keys.shape[1]
    width = C - start - 1  # neighbour pairs per row
    if width < 1:
        return
    # Neighbours xor-ed in the flat layout (contiguous operands: ~2x faster than two strided
    # slices): flat entry r C + c compares (r, c) with (r, c + 1); the last column crosses rows
    # and is dropped. hits: flat indices into (B, width) of the tied pairs (start+j, start+j+1).
    neighbours = _buffer_like(keys, spare)
    cpu = _NUMPY_ON_CPU and keys.device.type == "cpu"
    if cpu:  # numpy: same passes, a fraction of torch's per-call cost (it dominates at small C)
        flat_keys, xor = keys.view(-1).numpy(), neighbours.view(-1).numpy()
        np.bitwise_xor(flat_keys[1:], flat_keys[:-1], out=xor[:-1])
        # 1-d nonzero: numpy's 2-d one is ~10x slower
        hits = (xor.reshape(keys.shape)[:, start:C - 1] < (1 << bits)).reshape(-1).nonzero()[0].tolist()
    else:
        torch.bitwise_xor(keys.view(-1)[1:], keys.view(-1)[:-1], out=neighbours.view(-1)[:-1])
        hits = (neighbours[:, start:C - 1] < (1 << bits)).view(-1).nonzero()[:, 0].tolist()
    if not hits:
        return
    entries: list[int] = []  # every tied entry (flat index into keys.view(-1)), in row-major order
    run_of: list[int] = []  # the run each entry belongs to
    for hit in hits:  # row-major: each row's tied pairs in order
        row, j = divmod(hit, width)
        f = row * C + start + j  # pair (f, f + 1), both in this row since start + j <= C - 2
        if entries and entries[-1] == f:  # continues the run that ends at f
            entries.append(f + 1)
            run_of.append(run_of[-1])
        else:
            entries += [f, f + 1]
            run_of += [hit, hit]  # run id: its first pair's hit, increasing along entries
    ranks = torch.randperm(len(entries), generator=generator, device=keys.device).tolist()
    shuffled = [e for _, _, e in sorted(zip(run_of, ranks, entries))]  # each run in rank order
    if cpu:
        flat = keys.view(-1).numpy()
        flat[entries] = flat[shuffled]
    else:
        index = torch.tensor(entries + shuffled, dtype=torch.int64, device=keys.device)
        flat = keys.view(-1)
        flat[index[: len(entries)]] = flat[index[len(entries):]]


def anchor_first_orders(anchor: Tensor, num_classes: int, generator: torch.Generator,
                        spare: Tensor | None = None) -> Tensor:
    """Per row, the anchor column followed by the other C - 1 columns in uniformly random order.

    Random-key sort with the column index in the low bits of each key: i.i.d. random bits
    (non-negative int32 keys for C <= 1024, int64 above), the low ``bits(C - 1)`` replaced by
    the column index, the anchor's key set to the dtype's minimum so that it sorts first, then
    one row-wise sort of the keys' *values* (see :func:`_sort_rows_`; no argsort) from which the
    column is read back. Keys that drew the same random bits (at C = 1000, 21 random bits:
    about 1 row in 5) would be ordered by column index; :func:`_shuffle_tied_runs_` orders them
    at random instead, so the result is exactly uniform over the (C - 1)! orders,
    independently per row.

    Args:
        anchor: (B,) int64 column per row that goes first.
        num_classes: C >= 2.
        generator: torch.Generator on ``anchor``'s device; the only source of randomness.
        spare: optional tensor whose memory may be overwritten as scratch (contents lost).

    Returns:
        (B, C) integer tensor (int32 for C <= 1024, else int64) of column indices; column 0
        is the anchor slot and holds 0 (the low bits of the anchor's key), not the anchor.
    """
    B, C, device = anchor.shape[0], num_classes, anchor.device
    if (C - 1).bit_length() <= _NARROW_MAX_INDEX_BITS:
        # One int64 draw per two keys: cheaper than one int32 draw per key.
        words = torch.empty((B * C + 1) // 2, dtype=torch.int64, device=device)
        keys = words.random_(generator=generator).view(torch.int32)[: B * C].view(B, C)
    else:
        keys = torch.empty((B, C), dtype=torch.int64, device=device).random_(generator=generator)
    return _orders_from_random_bits_(keys, anchor, generator, spare)


def _orders_from_random_bits_(keys: Tensor, anchor: Tensor, generator: torch.Generator,
                              spare: Tensor | None = None) -> Tensor:
    """:func:`anchor_first_orders` from drawn (B, C) int32/int64 random ``keys`` (overwritten)."""
    C, dtype = keys.shape[1], keys.dtype
    bits = max(1, (C - 1).bit_length())
    mask = (1 << bits) - 1
    # Keep the random bits between the sign bit (cleared: keys >= 0) and the low ``bits``.
    cols = torch.arange(C, dtype=dtype, device=keys.device)
    keys.bitwise_and_(torch.iinfo(dtype).max & ~mask).bitwise_or_(cols)
    keys.scatter_(1, anchor.unsqueeze(1), torch.iinfo(dtype).min)  # the only negative key
    keys = _sort_rows_(keys)
    _shuffle_tied_runs_(keys, bits, generator, start=1, spare=spare)  # column 0 is the anchor
    return keys.bitwise_and_(mask)  # (B, C) column indices in sorted order


def permute_dark_knowledge(
    teacher_probs: Tensor,
    anchor: Tensor,
    destination: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Move each row's anchor value to ``destination`` and permute the rest uniformly.

    Vectorised (no loop over samples): :func:`anchor_first_orders` gives per row the anchor
    followed by a uniformly random order of the other C - 1 columns; that list is turned into
    gather indices by writing the anchor at position ``destination`` and the column that was
    there at position 0 (a fixed rule, so the C - 1 non-anchor values land on the C - 1
    non-destination classes in uniformly random order), then one ``index_select``. So every
    bijection of the C - 1 non-anchor values onto the C - 1 non-destination classes is equally
    likely, independently per row, and the draws come only from ``generator``. Differentiable
    in ``teacher_probs`` (a permutation), though DKPP itself passes a detached teacher.

    Args:
        teacher_probs: (B, C) rows to permute.
        anchor: (B,) int64 column whose value is kept (the teacher argmax).
        destination: (B,) int64 column that receives the anchor value (``anchor`` itself,
            or the label for ``anchor="label"``).
        generator: torch.Generator on ``teacher_probs``' device.

    Returns:
        (B, C) permuted rows; each row is a rearrangement of the input row (same values).
    """
    B, C = teacher_probs.shape
    # The result's memory doubles as scratch for the permutation (not when autograd needs it).
    out = None
    if not teacher_probs.requires_grad:
        out = torch.empty_like(teacher_probs, memory_format=torch.contiguous_format)
    index = anchor_first_orders(anchor, C, generator, spare=out)  # (B, C)
    if B * C > torch.iinfo(index.dtype).max:
        index = index.long()
    dest = destination.unsqueeze(1)  # (B, 1)
    index[:, :1] = index.gather(1, dest)
    index.scatter_(1, dest, anchor.unsqueeze(1).to(index.dtype))
    # Flat indices into teacher_probs: index_select takes int32 indices, gather only int64.
    index += torch.arange(0, B * C, C, dtype=index.dtype, device=index.device).unsqueeze(1)
    flat = teacher_probs.reshape(-1)
    if out is None:
        return flat.index_select(0, index.view(-1)).view(B, C)
    return torch.index_select(flat, 0, index.view(-1), out=out.view(-1)).view(B, C)


@register_objective("dkpp")
class DarkKnowledgePermutedPredictions(Objective):
    """DKPP (paper eq. 11): CE to the teacher distribution with non-argmax entries permuted.

    Args:
        anchor: "argmax" (paper: the teacher's max stays at its argmax) or "label" (ablation:
            the teacher's max goes to the label, the rest are permuted over the other classes).
    """

    needs_generator = True

    def __init__(self, anchor: str = "argmax") -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"dkpp anchor must be one of {', '.join(ANCHORS)}; got {anchor!r}")
        super().__init__(anchor=anchor)
        self.anchor = anchor

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B = student_logits.shape[0]
        p = torch.softmax(teacher_logits, dim=1)  # (B, C)
        # The first maximal index on ties (as torch.argmax); any fixed choice is valid since tied
        # values are equal, and the rule is documented for reproducibility.
        argmax = row_argmax(p)  # (B,)
        destination = argmax if self.anchor == "argmax" else target
        target_dist = permute_dark_knowledge(p, argmax, destination, generator)  # (B, C)
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, 1.0 / B)
        return ObjectiveOutput(loss, grad, target_dist, weight)
