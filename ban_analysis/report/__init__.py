"""Reports on study folders: loading, attribution by roles, hook-log summaries, figures, the writer.

Reads only files written by ``ban-analysis study`` (their layout is ``ban_analysis.layout``);
never live objects, never torch. ``load`` reads folders, ``roles`` says which variant is the
reference, a probe, a control or the label-only retrain (study.json's roles), ``attribution``
chooses the paired comparisons and ``rules`` words the verdicts, ``components`` splits the
reference's gain into the parts of the teacher's signal, ``gradients`` and ``noise`` summarise hook
logs and metrics, ``figures`` returns matplotlib Figures, ``writer`` (with ``sections`` and
``document``) writes ``<study>/report/``.

    from ban_analysis.report import load_study, attribute, write_report
    study = load_study("studies/fmnist")
    result = attribute(study)
    headline = result.answer["headline"]
"""

from ban_analysis.report.attribution import (
    ANSWER_RULES, FAMILIES, FRACTION_RULES, VERDICT_RULES, Attribution, answer_question, attribute,
    fraction_verdict, verdict,
)
from ban_analysis.report.components import component_analysis, seeds_needed
from ban_analysis.report.document import to_jsonable
from ban_analysis.report.gradients import (
    fix_rate_by_bin, fixes, fixes_summary, heldout_attribution_by_step, heldout_attribution_summary,
    param_cos_by_epoch, param_cos_summary, teacher_test_features, term_sizes, update_share_by_epoch,
    update_share_summary,
)
from ban_analysis.report.load import (
    Study, load_hook, load_metrics, load_study, load_test_outputs, seed_matrix, student_label,
)
from ban_analysis.report.noise import noise_comparisons, noise_metrics, noisy_vs_clean_by_epoch, noisy_vs_clean_summary
from ban_analysis.report.writer import write_report

__all__ = [
    "ANSWER_RULES", "FAMILIES", "FRACTION_RULES", "VERDICT_RULES", "Attribution", "Study", "answer_question",
    "attribute", "component_analysis", "fix_rate_by_bin", "fixes", "fixes_summary", "fraction_verdict",
    "heldout_attribution_by_step", "heldout_attribution_summary", "load_hook", "load_metrics", "load_study",
    "load_test_outputs", "noise_comparisons", "noise_metrics", "noisy_vs_clean_by_epoch", "noisy_vs_clean_summary",
    "param_cos_by_epoch", "param_cos_summary", "seed_matrix", "seeds_needed", "student_label",
    "teacher_test_features", "term_sizes", "to_jsonable", "update_share_by_epoch", "update_share_summary", "verdict",
    "write_report",
]
