"""Every command line the operator puts in a pod parses with the real `epd
worker` and `epd router` parsers, with the values it meant."""

from __future__ import annotations

import argparse

import pytest

from epd.operator import pods
from epd.operator.naming import Owner
from epd.operator.spec import EPDDeploymentSpec
from epd.stages import STAGES
from epd.workers.launcher import worker_cli
from epd.workers.router import cli as router_cli

OWNER = Owner("llava", "prod", "uid-1")
VARIANTS = [{}, {"tls": {"enabled": False}, "grpcReflection": True},
            {"model": {"name": "llava-7b", "pvc": "weights"}, "cache": {"prefixCacheBytes": 0},
             **{stage: {"maxBatch": 8} for stage in STAGES}},
            {"router": {"apiKeySecret": "keys", "metricsPort": 9200}}]


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    module.add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag even with exit_on_error=False
        pytest.fail(f"{argv} does not parse: {exc}")


@pytest.mark.parametrize("raw", VARIANTS)
def test_worker_command_lines_parse(raw):
    spec = EPDDeploymentSpec.from_resource({"model": {"name": "llava-hf/llava-1.5-7b-hf"}, **raw}, "img")
    for stage in STAGES:
        command = pods.stage_command(OWNER, spec, stage)
        assert command[:2] == ["epd", "worker"]
        args = parse(worker_cli, command[2:])
        assert (args.role, args.model, args.port, args.metrics_port, args.health_port) == \
            (stage, pods.model_argument(spec), 50051, 9090, 50052)
        assert args.redis_url == ""  # from EPD_REDIS_URL, so the password is never an argument
        assert args.drain_timeout == spec.stages[stage].termination_grace_period_seconds - pods.DRAIN_MARGIN
        assert bool(args.tls_cert) == spec.tls.enabled and args.grpc_reflection == spec.grpc_reflection
        assert args.kv_tcp_port == (50053 if stage == "decode" else 0)  # the port decode's NetworkPolicy opens


@pytest.mark.parametrize("raw", VARIANTS)
def test_router_command_lines_parse(raw):
    spec = EPDDeploymentSpec.from_resource({"model": {"name": "llava-hf/llava-1.5-7b-hf"}, **raw}, "img")
    command = pods.router_command(spec)
    assert command[:2] == ["epd", "router"]
    args = parse(router_cli, command[2:])
    assert (args.port, args.metrics_port, args.served_model_name) == \
        (spec.router.port, spec.router.metrics_port, spec.model.name)
    assert bool(args.tls_ca) == spec.tls.enabled and args.redis_url == ""


def test_a_stages_cpu_bounds_its_model_threads():
    """A container sees every core of its node: the worker gets threads for its CPU limit (else request)."""
    spec = EPDDeploymentSpec.from_resource({"model": {"name": "llava-hf/llava-1.5-7b-hf"},
                                            "encode": {"resources": {"limits": {"cpu": "2500m"}}},
                                            "prefill": {"resources": {"requests": {"cpu": "8"}}}}, "img")
    threads = {stage: parse(worker_cli, pods.stage_command(OWNER, spec, stage)[2:]).torch_threads
               for stage in STAGES}
    assert threads == {"encode": 3, "prefill": 8, "decode": 0}  # decode: no CPU bound, torch's default
