"""Why a stage's pods are not ready, as the kubelet reports it."""

from __future__ import annotations

from epd.operator.podreport import pod_problems

LOG_TAIL = ("Traceback ...\nepd worker: cannot download m/x@main from https://huggingface.co: the hub refused "
            "the credentials (HTTP 401)\n")


def pod(name: str, **status) -> dict:
    return {"metadata": {"name": name}, "status": {"containerStatuses": [{"name": "worker", "ready": False,
                                                                           **status}]}}


def test_a_crash_loop_reports_the_last_line_its_container_left():
    crashing = pod("x-encode-0", state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                   lastState={"terminated": {"exitCode": 2, "reason": "Error", "message": LOG_TAIL}})
    assert pod_problems([crashing]) == ("pod x-encode-0: CrashLoopBackOff: epd worker: cannot download m/x@main "
                                        "from https://huggingface.co: the hub refused the credentials (HTTP 401)")


def test_config_errors_and_exits_are_reported_and_starting_pods_are_not():
    missing = pod("a-0", state={"waiting": {"reason": "CreateContainerConfigError",
                                            "message": 'secret "hf" not found'}})
    starting = pod("b-0", state={"waiting": {"reason": "ContainerCreating"}})
    exited = pod("c-0", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    assert pod_problems([starting, exited, missing]) == ('pod a-0: CreateContainerConfigError: secret "hf" not '
                                                         'found; pod c-0: exited with code 137: OOMKilled')
    assert pod_problems([starting]) == ""
    twins = [pod(f"d-{i}", state={"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}})
             for i in range(3)]
    assert pod_problems(twins) == "pod d-0: ImagePullBackOff: no such image"  # the same problem once
