"""Who sets a stage's replicas: the EPDStage's writers and their order."""

from __future__ import annotations

from epd.operator import epdstage
from epd.operator.naming import Owner
from epd.operator.spec import StageSpec

STAGE = StageSpec(replicas=2, min_replicas=1, max_replicas=5)


def scale(replicas: int) -> dict:
    return {"metadata": {"generation": 3}, "spec": {"deployment": "d", "stage": "decode", "replicas": replicas}}


def test_a_new_stage_starts_from_what_runs_or_the_spec():
    assert epdstage.decide(STAGE, False, {}, None, None) == epdstage.StageReplicas(2, epdstage.CREATED)
    running = {"spec": {"replicas": 4}}
    assert epdstage.decide(STAGE, False, {}, None, running).replicas == 4  # a deleted EPDStage changes nothing
    assert epdstage.decide(STAGE, True, {"scaledReplicas": 3}, None, running).replicas == 3


def test_external_scalers_win_while_the_builtin_autoscaler_is_off():
    record = {"declaredReplicas": 2}
    assert epdstage.decide(STAGE, False, record, scale(7), None) == epdstage.StageReplicas(7)
    assert epdstage.decide(STAGE, False, {**record, "scaledReplicas": 4}, scale(7), None).replicas == 7


def test_an_edit_of_the_deployments_replicas_is_written_through():
    changed = epdstage.decide(StageSpec(3, 1, 5), False, {"declaredReplicas": 2}, scale(7), None)
    assert changed == epdstage.StageReplicas(3, epdstage.DECLARED)
    assert epdstage.decide(StageSpec(3, 1, 5), True, {"declaredReplicas": 2, "scaledReplicas": 4}, scale(4),
                           None).write == epdstage.DECLARED


def test_the_builtin_autoscaler_wins_while_it_is_on():
    record = {"declaredReplicas": 2, "scaledReplicas": 4}
    assert epdstage.decide(STAGE, True, record, scale(9), None) == epdstage.StageReplicas(4, epdstage.AUTOSCALER)
    assert epdstage.decide(STAGE, True, record, scale(4), None) == epdstage.StageReplicas(4)
    assert epdstage.decide(STAGE, True, {"declaredReplicas": 2}, scale(9), None).replicas == 9  # no choice yet


def test_scale_object_claims_replicas_only_at_creation_and_reports_the_selector():
    owner = Owner("d", "ns", "u")
    assert "replicas" not in epdstage.scale_object(owner, "decode")["spec"]
    assert epdstage.scale_object(owner, "decode", 3)["spec"] == {"deployment": "d", "stage": "decode", "replicas": 3}
    status = epdstage.status(owner, "decode", scale(3), {"status": {"replicas": 3, "readyReplicas": 2}})
    assert status == {"replicas": 3, "readyReplicas": 2, "observedGeneration": 3,
                      "selector": "app.kubernetes.io/instance=d,app.kubernetes.io/component=decode"}
