"""Roofline and profile-fitted stage costs."""

from __future__ import annotations

import json

import pytest

from epd.operator.sizing.architectures import get_architecture
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.perfmodel import load_profile, profile_document, roofline


def test_roofline_shapes():
    model = roofline(get_architecture("llava-1.5-7b"), get_hardware("h100"))
    c = model.costs
    # attention makes each extra token cost more than the last
    assert c.prefill_time([4000]) - c.prefill_time([2000]) > c.prefill_time([2000]) - c.prefill_time([0]) > 0
    assert c.decode_time(64, 64 * 1000) < 8 * c.decode_time(1, 1000)  # batching amortises the weight reads
    assert c.decode_fixed == pytest.approx(0.001 + 6.7e9 * 2 / (3.35e12 * 0.7))
    assert model.kv_capacity_tokens() == int((80e9 * 0.9 - 13.4e9) / (2 * 32 * 32 * 128 * 2))
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
    costs = load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb")).costs
    assert costs.encode_per_patch_token == pytest.approx(2e-5, rel=1e-6)
    assert costs.prefill_per_token_squared == pytest.approx(2e-9, rel=1e-6)
    assert costs.decode_per_context_token == pytest.approx(1e-7, rel=1e-6)
    path.write_text(json.dumps({**profile_document("m", "gpu", encode, prefill, decode), "version": 99}))
    with pytest.raises(ValueError, match="profile version 99"):
        load_profile(path, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb"))


def test_epd_profile_times_the_real_stages(tmp_path):
    import subprocess

    from epd.workers.launcher.processes import epd_command

    out = tmp_path / "tiny.json"
    result = subprocess.run(epd_command("profile", "--model", "tiny-llava", "--image-size", "48x48", "--repeats", "1",
                                        "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert [s["images"] for s in document["encode"]] == [1, 2, 4, 8]
    assert [s["tokens"] for s in document["prefill"]] == [[64], [256], [512], [256, 256], [128] * 4]
    assert [s["sequences"] for s in document["decode"]] == [1, 4, 8, 16]
    assert all(s["seconds"] > 0 for stage in ("encode", "prefill", "decode") for s in document[stage])
    # Slopes are not compared: one repeat on a shared CPU is too noisy to order them.
    fitted = load_profile(out, get_architecture("llava-1.5-7b"), get_hardware("a100-80gb")).costs
    assert min(vars(fitted).values()) >= 0 and fitted.prefill_time([64]) > 0 and fitted.decode_time(1, 130) > 0
