"""The two documents that travel with the weights: a model card for people and the ONC HTI-1
predictive decision support source attributes (45 CFR 170.315(b)(11)(iv)(B)) as JSON.

Both say only what the pipeline measured; anything it did not assess says "not assessed",
never a guess.
"""

from __future__ import annotations

from typing import Any

from model.artifact import RiskThresholds
from model.tasks import Task

NOT_ASSESSED = "not assessed"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def model_card(
    name: str, version: str, metrics: dict[str, Any], thresholds: dict[Task, RiskThresholds]
) -> str:
    training = metrics["training"]
    lines = [
        f"# {name} {version}",
        "",
        "EHRMamba (Fallahpour et al., ML4H 2024) trained with Multitask Prompted Finetuning, "
        "task token at the end of the input. It reads a patient's FHIR Procedure, "
        "MedicationRequest, Observation, Encounter, Condition and Patient resources and "
        "returns probabilities for the tasks below, plus next-event forecasts.",
        "",
        "## Intended use",
        "Research and evaluation of risk scoring next to an EHR, with a clinician deciding. "
        "Not a medical device; not validated on real patients.",
        "",
        "## Training data",
        f"Synthetic FHIR R4 patients: {', '.join(training['sources'])}. Splits by a hash of "
        "the patient id (pretrain 57 %, finetune 28 %, test 15 %); a fifth of the finetune "
        "patients are held out for validation (epochs, thresholds, the served seed).",
        "",
        "## Performance on the test split (mean and sd over seeds)",
        "",
        "| task | n | positives | AUROC | AUPRC | moderate from | high from |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for task, entry in metrics["tasks"].items():
        mpf = entry.get("ehrmamba_mpf", {})
        auroc, auprc = mpf.get("auroc", {}), mpf.get("auprc", {})
        limit = thresholds.get(Task(task))
        moderate, high = (limit.moderate, limit.high) if limit else (None, None)
        lines.append(
            f"| {task} | {entry['n']} | {entry['positives']} | "
            f"{_number(auroc.get('mean'))} ± {_number(auroc.get('sd'))} | "
            f"{_number(auprc.get('mean'))} ± {_number(auprc.get('sd'))} | "
            f"{_number(moderate)} | {_number(high)} |"
        )
    for task, reason in metrics["not_trained"].items():
        lines.append(f"| {task} | - | - | not trained: {reason} | | | |")
    lines += [
        "",
        "Risk levels: `moderate` from the threshold with the best F1 on validation patients; "
        "`high` from the median score of validation patients who had the outcome.",
        "",
        "## Limitations",
        "- Trained and tested on synthetic data only; performance on a hospital's own "
        "patients is unknown until measured locally.",
        "- Tasks with few test positives have wide confidence intervals (see metrics.json).",
        "- Fairness across demographic groups: " + NOT_ASSESSED + ".",
        "",
        f"Training: {sum(training['stage_seconds'].values()) / 60:.1f} min over all stages, "
        f"peak memory "
        f"{training['peak_rss_mb']:.0f} MB on {training['machine']}. "
        f"Command: `{training['command']}`.",
        "",
    ]
    return "\n".join(lines)


def source_attributes(name: str, version: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The HTI-1 predictive DSI source attributes, grouped as the rule lists them."""
    training = metrics["training"]
    validity = {
        task: {m: v for m, v in entry.items() if m == "ehrmamba_mpf"}
        | {"n": entry["n"], "positives": entry["positives"]}
        for task, entry in metrics["tasks"].items()
    }
    return {
        "intervention": {"name": name, "version": version},
        "details_and_output": {
            "developer": "the EHRMamba FHIR inference service project (open source)",
            "funding_source": NOT_ASSESSED,
            "output": "probability per task (0-1) with a risk level (low, moderate, high), "
            "and forecast next events with probabilities",
            "output_type": "prediction",
        },
        "purpose": {
            "intended_use": "estimate risks of in-hospital mortality, prolonged stay, "
            "30-day readmission and three conditions from a patient's FHIR record",
            "intended_patient_population": "adults and children with records in the EHR; "
            "inpatient tasks for patients with an inpatient stay",
            "intended_users": "clinicians and care teams, through CDS Hooks cards",
            "decision_making_role": "informs; never replaces clinical judgement",
        },
        "cautioned_out_of_scope_use": {
            "description": "trained on synthetic patients only: do not use for care "
            "decisions before local validation; tasks listed as not trained are not scored",
            "not_trained": metrics["not_trained"],
            "known_risks_and_limitations": "few positives for several tasks; wide "
            "confidence intervals; calibration measured on synthetic data only",
        },
        "development": {
            "training_data": training["sources"],
            "inclusion_and_exclusion_criteria": "docs/tasks.md: index visits, censoring, "
            "counted exclusions per task",
            "input_features": "codes of procedures, medications, laboratory results "
            "(binned), conditions are not inputs for their own tasks' labels; age; visit "
            "structure and time",
            "uses_race_ethnicity_language_sexual_orientation_gender_identity": False,
            "uses_sex": False,
            "uses_date_of_birth": "as age only",
            "uses_social_determinants_of_health": False,
            "uses_health_status_assessments": False,
            "demographic_representativeness": NOT_ASSESSED,
            "relevance_to_deployment_setting": "synthetic US-style records; "
            + NOT_ASSESSED
            + " for any real setting",
        },
        "fairness_process": {"approach": NOT_ASSESSED, "bias_management": NOT_ASSESSED},
        "external_validation": {
            "data_source": NOT_ASSESSED,
            "party": NOT_ASSESSED,
            "process": NOT_ASSESSED,
        },
        "quantitative_performance": {
            "validity_same_source_test_data": validity,
            "fairness_same_source_test_data": NOT_ASSESSED,
            "validity_external_data": NOT_ASSESSED,
            "fairness_external_data": NOT_ASSESSED,
            "outcome_evaluations": NOT_ASSESSED,
        },
        "ongoing_maintenance": {
            "update_and_validation_schedule": "retrain and re-export with `ehrmamba train` "
            "when the data or the code changes; every artifact carries its metrics",
            "validity_in_local_data": NOT_ASSESSED,
            "fairness_in_local_data": NOT_ASSESSED,
        },
    }
