"""Seed studies: plan (seeds x variants x generations), execute (local or Ray), collect results.csv."""

from ban_analysis.layout import RESULT_COLUMNS
from ban_analysis.study.collect import collect_results
from ban_analysis.study.executors import run_study
from ban_analysis.study.plan import RunSpec, StudyConfig, Variant, load_study, plan_runs, study_from_dict

__all__ = ["RESULT_COLUMNS", "RunSpec", "StudyConfig", "Variant", "collect_results", "load_study", "plan_runs",
           "run_study", "study_from_dict"]
