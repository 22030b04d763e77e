"""`epd plan` as a user runs it."""

from __future__ import annotations

import json
import subprocess

from epd.stages import STAGES
from epd.workers.launcher.processes import epd_command

PAPER_SETTING = ["--model", "minicpm-v-2.6", "--hardware", "a100-80gb", "--gpus", "8", "--slo-tpot", "0.06",
                 "--images-per-request", "8", "--image-size", "4032x3024", "--prompt-tokens", "22",
                 "--output-tokens", "10", "--rate", "0.5", "--requests", "200"]
TIGHT_TTFT = [*PAPER_SETTING, "--slo-ttft", "2.5"]  # only intra-request parallelism gets 8 photos under 2.5 s


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(epd_command("plan", *args), capture_output=True, text=True, timeout=600, check=False)


def test_json_recommends_epd_when_it_has_the_most_goodput():
    result = plan(*TIGHT_TTFT, "--format", "json", "--explain")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    plans = out["plans"]
    assert out["recommended_mode"] == "epd" and out["plan"] == plans["epd"]
    assert set(plans) == {"epd", "bundled", "colocated"} and plans["epd"]["gpus"] == plans["bundled"]["gpus"] == 8
    assert plans["epd"]["goodput_rps"] > max(plans["bundled"]["goodput_rps"], plans["colocated"]["goodput_rps"])
    assert plans["epd"]["slo_attainment"] >= 0.9
    assert plans["bundled"]["bound"].startswith("encode+prefill (latency: ")  # one GPU encodes all 8 photos
    assert out["statement"].startswith(f"Recommended: EPD {plans['epd']['label']} (")
    spec = out["epddeployment"]["spec"]
    assert sum(spec[s]["replicas"] for s in STAGES) == 8
    assert out["epddeployment"]["kind"] == "EPDDeployment"
    stages = out["explain"]["stages"]
    assert set(stages) == {"encode", "prefill", "decode"}
    assert stages["encode"]["weights_gb"] == 0.936 and stages["prefill"]["weights_gb"] == 15.2
    assert stages["encode"]["kv_tokens"] == 0 and stages["decode"]["kv_tokens"] > stages["prefill"]["kv_tokens"] > 0
    assert out["explain"]["limits"] == {"image": "4032x3024", "largest_encode_batch": 223,
                                        "images_per_request_memory": 1442, "images_per_request_context": 51}


def test_the_issue_setting_recommends_the_bundled_plan_and_says_why(tmp_path):
    result = plan(*PAPER_SETTING, "--slo-ttft", "5.1", "--explain")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"EPD", "bundled", "colocated"}
    assert "encode (compute: " in rows["EPD"] and "encode+prefill (compute: " in rows["bundled"]
    statement = next(line for line in lines if line.startswith("Recommended: "))
    assert statement.startswith("Recommended: bundled 7EP1D") and "EPD does not win here" in statement
    assert "kind: EPDDeployment" not in result.stdout  # no manifest for a mode the operator does not deploy
    # --explain: the chosen plan's time and memory per stage, and what memory allows
    assert any(line.startswith("bundled 7EP1D at ") and "encode+prefill " in line for line in lines)
    holder = next(line for line in lines if line.startswith("encode+prefill  "))
    assert "16.1GB" in holder and "1.5GB" in holder  # vision + language weights, runtime reserve
    assert "memory limits for 4032x3024 images: largest encode batch 156, images per request 156 by memory and 51 " \
           "by the context window" in result.stdout
    epd_only = plan(*PAPER_SETTING, "--slo-ttft", "5.1", "--mode", "epd", "--requests", "100")
    assert epd_only.returncode == 0, epd_only.stderr
    assert "Recommended: EPD " in epd_only.stdout and "kind: EPDDeployment" in epd_only.stdout


def test_a_budget_too_small_for_epd_gets_the_other_modes():
    result = plan("--model", "llava-1.5-7b", "--gpus", "2", "--slo-ttft", "2", "--slo-tpot", "0.05",
                  "--requests", "100", "--format", "json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out["plans"]) == {"bundled", "colocated"} and out["epddeployment"] is None
    assert out["statement"].endswith("EPD does not win here: EPD needs 3 GPUs or more. The operator deploys EPD "
                                     "only; `--mode epd` plans and prints an EPDDeployment for it.")


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
        "no GPUs": (["--model", "llava-1.5-7b", "--gpus", "0", "--slo-ttft", "2", "--slo-tpot", "0.05"],
                    "GPU budget must be >= 1, got 0"),
        "budget too small for EPD": (["--model", "llava-1.5-7b", "--mode", "epd", "--gpus", "2", "--slo-ttft", "2",
                                      "--slo-tpot", "0.05"], "GPU budget 2 is too small for epd: it needs 3"),
        "image size": (["--model", "llava-1.5-7b", *base, "--image-size", "4032"],
                       "argument --image-size: an image size looks like WIDTHxHEIGHT with positive numbers, got '4032'"),
        "malformed trace": (["--model", "llava-1.5-7b", *base, "--trace", str(trace)], "trace.jsonl:2: malformed"),
    }
    for name, (args, message) in cases.items():
        result = plan(*args)
        assert result.returncode == 2, name
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
