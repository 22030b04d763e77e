"""Roofline and profile-fitted stage costs."""

from __future__ import annotations

import json

import pytest

from epd.operator.sizing.architectures import get_architecture
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.perfmodel import roofline
from epd.operator.sizing.profile import load_profile, profile_document
from epd.stages import STAGES


def test_roofline_shapes():
    model = roofline(get_architecture("llava-1.5-7b"), get_hardware("h100"))
    c = model.costs
    # attention makes each extra token cost more than the last
    assert c.prefill_time([4000]) - c.prefill_time([2000]) > c.prefill_time([2000]) - c.prefill_time([0]) > 0
    assert c.decode_time(64, 64 * 1000) < 8 * c.decode_time(1, 1000)  # batching amortises the weight reads
    assert c.decode_fixed == pytest.approx(0.001 + 6.7e9 * 2 / (3.35e12 * 0.7))
    decode = model.instance_memory("decode", decode_batch=128)
    assert model.kv_capacity_tokens() == decode.kv_tokens == int(
        (80e9 * 0.9 - 6.7e9 * 2 - 1.5e9 - decode.activation) // (2 * 32 * 32 * 128 * 2))
    slower = roofline(get_architecture("llava-1.5-7b"), get_hardware("l40s"))
    assert slower.costs.decode_time(8, 8000) > c.decode_time(8, 8000)


def test_tiles_and_tokens():
    internvl = get_architecture("internvl2-8b")
    assert internvl.tiles(4032, 3024) == 13 and internvl.image_tokens(4032, 3024) == 13 * 256
    assert internvl.tiles(400, 300) == 1
    assert get_architecture("llava-1.5-7b").image_tokens(4032, 3024) == 576


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        get_architecture("gpt-9")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")


def test_profile_fit_recovers_the_costs(tmp_path):
    truth = {"encode": (0.01, 2e-5, 0.003), "prefill": (0.004, 1e-5, 2e-9), "decode": (0.002, 3e-4, 1e-7)}
    encode = [{"patch_tokens": p, "megapixels": m, "images": 1,
               "seconds": truth["encode"][0] + truth["encode"][1] * p + truth["encode"][2] * m}
              for p, m in ((576, 0.1), (1152, 0.3), (4608, 1.2), (2304, 0.2))]
    prefill = [{"tokens": t, "seconds": truth["prefill"][0] + truth["prefill"][1] * sum(t)
                + truth["prefill"][2] * sum(x * x for x in t)} for t in ([100], [1000], [500, 500], [4000])]
    decode = [{"sequences": b, "context_tokens": ctx, "seconds": truth["decode"][0] + truth["decode"][1] * b
               + truth["decode"][2] * ctx} for b, ctx in ((1, 500), (8, 8000), (32, 20000), (4, 90000))]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_document("m", "gpu", encode, prefill, decode)))
    model = load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))
    costs = model.costs
    assert costs.encode_per_patch_token == pytest.approx(2e-5, rel=1e-6)
    assert costs.prefill_per_token_squared == pytest.approx(2e-9, rel=1e-6)
    assert costs.decode_per_context_token == pytest.approx(1e-7, rel=1e-6)
    assert model.source.endswith("(memory: roofline)")  # no memory measured: the architecture's forms
    path.write_text(json.dumps({**profile_document("m", "gpu", encode, prefill, decode), "version": 99}))
    with pytest.raises(ValueError, match="profile version 99"):
        load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))


def test_profile_fit_recovers_the_memory_forms(tmp_path):
    encode = [{"patch_tokens": p, "megapixels": p / 5000, "seconds": 0.01 + 1e-5 * p, "peak_bytes": 4096 + 3000 * p}
              for p in (577, 1154, 2308, 4616)]
    prefill = [{"tokens": t, "seconds": 0.01 * len(t), "peak_bytes": 65536 + 200 * sum(t)}
               for t in ([64], [256], [512], [256, 256])]
    decode = [{"sequences": b, "context_tokens": 100 * b, "seconds": 0.01 + 0.001 * b, "peak_bytes": 9000 * b}
              for b in (1, 4, 8, 16)]
    memory = {"method": "test", "vision_weight_bytes": 1e6, "language_weight_bytes": 5e7,
              "runtime_reserve_bytes": 3e8, "kv_bytes_per_token": 2048}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_document("m", "gpu", encode, prefill, decode, memory)))
    fitted = load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb")).memory
    assert fitted.encode_fixed == pytest.approx(4096) and fitted.encode_per_patch_token == pytest.approx(3000)
    assert fitted.prefill_fixed == pytest.approx(65536) and fitted.prefill_per_token == pytest.approx(200)
    assert fitted.decode_per_sequence == pytest.approx(9000) and fitted.decode_fixed == pytest.approx(0, abs=1e-6)
    assert (fitted.vision_weights, fitted.language_weights, fitted.runtime_reserve, fitted.kv_per_token) == (
        1e6, 5e7, 3e8, 2048)
    del memory["kv_bytes_per_token"]
    path.write_text(json.dumps(profile_document("m", "gpu", encode, prefill, decode, memory)))
    with pytest.raises(ValueError, match="lacks 'kv_bytes_per_token'"):
        load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))


def test_epd_profile_times_the_real_stages(tmp_path):
    import subprocess

    from epd.workers.launcher.processes import epd_command

    out = tmp_path / "tiny.json"
    result = subprocess.run(epd_command("profile", "--model", "tiny-llava", "--image-size", "48x48", "--repeats", "1",
                                        "--out", str(out)), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert [s["images"] for s in document["encode"]] == [1, 2, 4, 8]
    assert [s["tokens"] for s in document["prefill"]] == [[64], [256], [512], [256, 256], [128] * 4]
    assert [s["sequences"] for s in document["decode"]] == [1, 4, 8, 16]
    assert all(s["seconds"] > 0 for stage in STAGES for s in document[stage])
    assert all(s["peak_bytes"] >= 0 for stage in STAGES for s in document[stage])
    memory = document["memory"]
    assert memory["method"].startswith("resident set high-water")  # CPU: torch keeps no allocator statistics
    # tiny-llava: 2-layer Llama, hidden 64 with 4 heads of 16 (2 KV heads), float32 -> 2 x 2 x 2 x 16 x 4 bytes
    assert memory["kv_bytes_per_token"] == 512
    assert 0 < memory["vision_weight_bytes"] < memory["language_weight_bytes"] < memory["runtime_reserve_bytes"]
    # Slopes are not compared: one repeat on a shared CPU is too noisy to order them.
    fitted = load_profile(out, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))
    costs = fitted.costs
    assert min(vars(costs).values()) >= 0 and costs.prefill_time([64]) > 0 and costs.decode_time(1, 130) > 0
    assert min(vars(fitted.memory).values()) >= 0 and fitted.source == str(out)
