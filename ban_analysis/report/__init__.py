"""Reports on study folders: loading, attribution by roles, hook-log summaries, figures, the writer.

Reads only files written by ``ban-analysis study`` (their layout is ``ban_analysis.layout``);
never live objects, never torch. ``load`` reads folders, ``attribution`` chooses the paired
comparisons and verdicts, ``gradients`` summarises hook logs, ``figures`` returns matplotlib
Figures, ``writer`` writes ``<study>/report/``.

    from ban_analysis.report import load_study, attribute, write_report
    study = load_study("studies/fmnist")
    result = attribute(study)
    headline = result.answer["headline"]
"""

from ban_analysis.report.attribution import (
    ANSWER_RULES, FAMILIES, FRACTION_RULES, VERDICT_RULES, Attribution, answer_question, attribute,
    fraction_verdict, verdict,
)
from ban_analysis.report.gradients import (
    fix_rate_by_bin, fixes, fixes_summary, param_cos_by_epoch, param_cos_summary, teacher_test_features,
    term_sizes, update_share_by_epoch, update_share_summary,
)
from ban_analysis.report.load import Study, load_hook, load_study, load_test_outputs, seed_matrix, student_label
from ban_analysis.report.writer import to_jsonable, write_report

__all__ = [
    "ANSWER_RULES", "FAMILIES", "FRACTION_RULES", "VERDICT_RULES", "Attribution", "Study", "answer_question",
    "attribute", "fix_rate_by_bin", "fixes", "fixes_summary", "fraction_verdict", "load_hook", "load_study",
    "load_test_outputs", "param_cos_by_epoch", "param_cos_summary", "seed_matrix", "student_label",
    "teacher_test_features", "term_sizes", "to_jsonable", "update_share_by_epoch", "update_share_summary", "verdict",
    "write_report",
]
