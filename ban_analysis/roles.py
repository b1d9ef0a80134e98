"""Who is who in a study, read from a study config (study.json): its variants, their objectives, roles and components.

The report never looks for objective names in its logic; it asks this module which variant is
the *reference* (whose gain over the teacher is explained), which are the *probes* (each isolates
one part of the teacher's signal), the *controls* and the *label-only* retrain, and which probes
or controls carry which *component* of the teacher's signal.

study.json is ``asdict(StudyConfig)`` (``ban_analysis.study.plan``): ``objectives`` (names, or
tables with ``name`` and ``objective``), ``variants`` (tables), ``roles`` (a table). Old study.json
files have neither ``variants`` nor ``roles``; the defaults below then apply, so they report as
before. Torch-free and below both the study planner (``StudyConfig.resolved_roles``) and the
report, which resolve roles with the same functions here: the planner over the configured
variants, the report over the variants results.csv has.

Roles resolve against the variants present in results.csv: a role whose variant has no rows is
dropped from the resolved roles, and :func:`declared_roles` keeps it so the report can say so.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["COMPONENTS", "DEFAULT_COMPONENT_OBJECTIVES", "DEFAULT_ROLES", "LABEL_ONLY_OBJECTIVES", "components",
           "declared_roles", "resolve_roles", "variant_objectives", "variant_names"]

# Defaults of the [roles] table.
DEFAULT_ROLES: dict[str, Any] = {"reference": "ban", "probes": ["cwtm", "dkpp"], "label_only": "ce"}
# Objectives trained on labels alone, without a teacher (a variant of one is no control).
LABEL_ONLY_OBJECTIVES = ("ce",)
# The parts of the teacher's signal the report attributes the reference's gain to, in report order.
COMPONENTS = {
    "confidence": "the teacher's confidence as a per-sample weight",
    "nontarget_mass": "the non-target mass, whatever its structure",
}
# Without roles.components, a probe or control carries a component when its objective is listed here.
DEFAULT_COMPONENT_OBJECTIVES = {"confidence": ("cwtm", "cwtc"), "nontarget_mass": ("dkpp", "tmls")}


def _entry_name(entry) -> str:
    """An ``objectives`` entry is a name, or a table with ``name`` (and ``objective``)."""
    if isinstance(entry, dict):
        return str(entry.get("name", entry.get("objective", "")))
    return str(entry)


def _tables(config: dict) -> list[tuple[str, str]]:
    """(name, objective) of every variant in config order: ``objectives`` entries, then ``variants``."""
    out = []
    for entry in config.get("objectives", []) or []:
        name = _entry_name(entry)
        objective = entry.get("objective", name) if isinstance(entry, dict) else name
        out.append((name, str(objective)))
    for table in config.get("variants", []) or []:
        if isinstance(table, dict) and "name" in table:
            out.append((str(table["name"]), str(table.get("objective", table["name"]))))
    return out


def variant_names(config: dict) -> list[str]:
    """Variant names in config order (``objectives`` entries, then ``variants`` tables)."""
    return list(dict.fromkeys(name for name, _ in _tables(config)))


def variant_objectives(config: dict, present: Iterable[str] = ()) -> dict[str, str]:
    """Variant name -> objective; a variant of results.csv the config does not list keeps its name."""
    out = dict(_tables(config))
    for name in present:
        out.setdefault(name, name)
    return out


def declared_roles(config: dict) -> dict[str, Any]:
    """The roles study.json declares, defaults filled in, not yet checked against results.csv."""
    roles = {**DEFAULT_ROLES, **(config.get("roles") or {})}
    return {"reference": roles.get("reference"), "probes": list(roles.get("probes") or []),
            "controls": None if roles.get("controls") is None else list(roles["controls"]),
            "label_only": roles.get("label_only")}


def resolve_roles(config: dict, present: list[str]) -> dict[str, Any]:
    """Roles restricted to the variants in ``present`` (results.csv order).

    Returns:
        {"reference": name | None, "probes": [..], "controls": [..], "label_only": name | None};
        controls default to every other present variant whose objective uses a teacher, in
        ``present`` order (as ``StudyConfig.resolved_roles`` does over the configured variants).
    """
    declared = declared_roles(config)
    objectives = variant_objectives(config, present)
    probes = [p for p in declared["probes"] if p in present]
    if declared["controls"] is None:
        special = {declared["reference"], declared["label_only"], *declared["probes"]}
        controls = [v for v in present if v not in special and objectives[v] not in LABEL_ONLY_OBJECTIVES]
    else:
        controls = [c for c in declared["controls"] if c in present]
    return {"reference": declared["reference"] if declared["reference"] in present else None,
            "probes": probes, "controls": controls,
            "label_only": declared["label_only"] if declared["label_only"] in present else None}


def components(config: dict, roles: dict[str, Any], present: list[str]) -> dict[str, list[str]]:
    """Component -> the present variants that carry it (``roles.components`` in study.json, else by objective).

    ``roles.components`` lists variant names per component; without it, a probe or control whose
    objective is in DEFAULT_COMPONENT_OBJECTIVES[component] carries that component.
    """
    given = (config.get("roles") or {}).get("components")
    if given is not None:
        return {c: [v for v in given.get(c, []) if v in present] for c in COMPONENTS}
    objectives = variant_objectives(config, present)
    candidates = [*roles["probes"], *roles["controls"]]
    return {c: [v for v in candidates if objectives[v] in DEFAULT_COMPONENT_OBJECTIVES[c]] for c in COMPONENTS}
