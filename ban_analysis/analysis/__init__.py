"""Analysis of study folders: loading, attribution statistics, and hook-log summaries.

Reads only files written by ``ban-analysis study`` (spec sections 7, 8, 10); never live objects.

    from ban_analysis.analysis import load_study, attribute
    study = load_study("studies/fmnist")
    result = attribute(study)
    headline = result.answer["headline"]
"""

from ban_analysis.analysis.attribution import (
    ANSWER_RULES, FAMILIES, FRACTION_RULES, VERDICT_RULES, Attribution, answer_question, attribute,
    fraction_verdict, verdict,
)
from ban_analysis.analysis.gradients import (
    fix_rate_by_bin, fixes, fixes_summary, param_cos_by_epoch, param_cos_summary, teacher_test_features,
    term_sizes, update_share_by_epoch, update_share_summary,
)
from ban_analysis.analysis.load import Study, load_hook, load_study, load_test_outputs, seed_matrix, student_label

__all__ = [
    "ANSWER_RULES", "FAMILIES", "FRACTION_RULES", "VERDICT_RULES", "Attribution", "Study", "answer_question",
    "attribute", "fix_rate_by_bin", "fixes", "fixes_summary", "fraction_verdict", "load_hook", "load_study",
    "load_test_outputs", "param_cos_by_epoch", "param_cos_summary", "seed_matrix", "student_label",
    "teacher_test_features", "term_sizes", "update_share_by_epoch", "update_share_summary", "verdict",
]
