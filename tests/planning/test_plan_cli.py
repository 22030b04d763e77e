"""`epd plan` as a user runs it."""

from __future__ import annotations

import json
import subprocess

from epd.workers.launcher.processes import epd_command

IMAGE_HEAVY = ["--model", "minicpm-v-2.6", "--hardware", "a100-80gb", "--gpus", "8", "--slo-ttft", "2.5",
               "--slo-tpot", "0.06", "--images-per-request", "8", "--image-size", "4032x3024",
               "--prompt-tokens", "22", "--output-tokens", "10", "--rate", "0.5", "--requests", "200"]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(epd_command("plan", *args), capture_output=True, text=True, timeout=300)


def test_json_plan_beats_the_best_bundled_plan_at_the_same_gpu_count():
    result = plan(*IMAGE_HEAVY, "--format", "json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["plan"]["mode"] == "epd" and out["plan"]["gpus"] == out["bundled"]["gpus"] == 8
    assert out["plan"]["goodput_rps"] > out["bundled"]["goodput_rps"]
    assert out["plan"]["slo_attainment"] >= 0.9
    assert {"goodput_rps", "slo_attainment"} <= set(out["colocated"])
    spec = out["epddeployment"]["spec"]
    assert sum(spec[s]["replicas"] for s in ("encode", "prefill", "decode")) == 8
    assert out["epddeployment"]["kind"] == "EPDDeployment"


def test_text_output_has_a_comparison_and_a_manifest():
    result = plan(*IMAGE_HEAVY)
    assert result.returncode == 0
    assert "bundled" in result.stdout and "colocated" in result.stdout and "kind: EPDDeployment" in result.stdout


def test_bad_input_is_named_without_a_traceback(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival": 0, "images": [[640, 480]], "prompt_tokens": 10, "output_tokens": 5}\n'
                     '{"arrival": "soon"}\n')
    base = ["--gpus", "8", "--slo-ttft", "2", "--slo-tpot", "0.05"]
    cases = {
        "unknown model": (["--model", "gpt-9", *base], "unknown model 'gpt-9'"),
        "unknown hardware": (["--model", "llava-1.5-7b", "--hardware", "tpu-v9", *base], "unknown hardware 'tpu-v9'"),
        "zero SLO": (["--model", "llava-1.5-7b", "--gpus", "8", "--slo-ttft", "0", "--slo-tpot", "0.05"],
                     "SLO targets must be > 0"),
        "budget too small": (["--model", "llava-1.5-7b", "--gpus", "2", "--slo-ttft", "2", "--slo-tpot", "0.05"],
                             "too small for EPD"),
        "malformed trace": (["--model", "llava-1.5-7b", *base, "--trace", str(trace)], "trace.jsonl:2: malformed"),
    }
    for name, (args, message) in cases.items():
        result = plan(*args)
        assert result.returncode == 2, name
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
