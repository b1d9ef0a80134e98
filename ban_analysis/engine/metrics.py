"""Evaluation metrics on logits: accuracy, NLL, ECE, agreement, and BAN ensembles (eq. 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15  # the usual choice since Guo et al. 2017; equal-width bins on the max probability


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE of (N, C) probabilities against (N,) labels with ``n_bins`` equal-width confidence bins."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).double()
    bins = torch.clamp((confidence.double() * n_bins).long(), max=n_bins - 1)
    conf_sum = torch.bincount(bins, weights=confidence.double(), minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / probs.shape[0])


def prob_metrics(probs, target) -> dict[str, float]:
    """Accuracy, NLL and ECE of (N, C) probabilities; accuracies are fractions in [0, 1]."""
    probs, target = _as_tensor(probs).double(), _as_tensor(target).long()
    nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), target).item()
    return {"acc": (probs.argmax(1) == target).double().mean().item(), "nll": nll,
            "ece": expected_calibration_error(probs, target)}


def logit_metrics(logits, target) -> dict[str, float]:
    return prob_metrics(torch.softmax(_as_tensor(logits).double(), dim=1), target)


def ensemble_metrics(member_logits: list, target, teacher_logits=None) -> dict[str, float]:
    """Average the members' softmax outputs (BAN ensemble, eq. 4) and score the average."""
    probs = torch.stack([torch.softmax(_as_tensor(z).double(), dim=1) for z in member_logits]).mean(0)
    out = prob_metrics(probs, target)
    if teacher_logits is not None:
        out["agreement"] = (probs.argmax(1) == _as_tensor(teacher_logits).argmax(1)).double().mean().item()
    return out
