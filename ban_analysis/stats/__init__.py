"""Statistics across seeds: pure functions of arrays shaped (seeds, ...); no torch, no files.

``paired`` holds the paired comparisons (t-test, exact sign-flip permutation, Wilcoxon, TOST,
bootstrap intervals) and Holm's correction; ``intervals`` gain fractions, mean CIs and
probability-of-improvement;
``power`` the paired-t power and the minimal detectable effect.
"""

from ban_analysis.stats.intervals import GainFraction, gain_fraction, mean_ci, probability_of_improvement_matrix
from ban_analysis.stats.paired import (
    EXACT_SIGN_FLIP_MAX_N, FamilyResult, PairedComparison, family_test, holm, paired_comparison, tost_paired,
)
from ban_analysis.stats.power import min_detectable_effect, paired_t_power

__all__ = [
    "EXACT_SIGN_FLIP_MAX_N", "FamilyResult", "GainFraction", "PairedComparison", "family_test", "gain_fraction",
    "holm", "mean_ci", "min_detectable_effect", "paired_comparison", "paired_t_power",
    "probability_of_improvement_matrix", "tost_paired",
]
