"""Stage memory: architecture facts, the memory forms, each instance's layout and what memory allows."""

from __future__ import annotations

import pytest

from epd.image_size import ImageSize
from epd.operator.sizing.architectures import ARCHITECTURES, Tower, get_architecture
from epd.operator.sizing.hardware import get_hardware
from epd.operator.sizing.limits import memory_limits
from epd.operator.sizing.memory import RUNTIME_RESERVE_BYTES
from epd.operator.sizing.perfmodel import roofline
from epd.operator.sizing.simulator import ServingConfig

PHOTO = ImageSize(4032, 3024)


def layer_params(tower: Tower) -> float:
    attention = 2 * tower.hidden ** 2 + 2 * tower.hidden * tower.kv_heads * tower.head_dim
    return tower.layers * (attention + (3 if tower.activation == "swiglu" else 2) * tower.hidden * tower.intermediate)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_layer_shapes_add_up_to_the_published_parameter_counts(name):
    arch = ARCHITECTURES[name]
    language = layer_params(arch.llm) + 2 * arch.vocab * arch.llm.hidden  # embeddings and an untied head
    assert language == pytest.approx(arch.llm.params, rel=0.03)
    assert layer_params(arch.vision) == pytest.approx(arch.vision.params, rel=0.05)


def test_kv_bytes_per_token_and_weights_per_stage():
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes
    assert get_architecture("minicpm-v-2.6").kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert get_architecture("internvl2-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert get_architecture("llava-1.5-7b").kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    model = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"))
    weights = {role: model.instance_memory(role).weights for role in ("encode", "prefill", "decode", "encode+prefill")}
    assert weights == {"encode": pytest.approx(0.936e9), "prefill": pytest.approx(15.2e9),
                       "decode": pytest.approx(15.2e9), "encode+prefill": pytest.approx(16.136e9)}


def test_vision_activations_per_patch_token_and_per_tile_with_eager_attention():
    arch = get_architecture("minicpm-v-2.6")
    flash = roofline(arch, get_hardware("a100-80gb")).memory
    # the MLP's peak: 4 hidden-wide tensors and fc1 + GELU outputs; fp32 pixels + bf16 copy; 64/1024 outputs
    assert flash.encode_per_patch_token == (4 * 1152 + 2 * 4304) * 2 + 3 * 14 * 14 * 6 + 64 / 1024 * 3584 * 2
    assert flash.encode_per_tile_token_squared == 0
    # Qwen2-7B: 4 hidden-wide tensors, act(gate), up and their product, rotary rows; H200 measured 142,856
    assert flash.prefill_per_token == (4 * 3584 + 3 * 18944 + 2 * 128) * 2 == 142848
    eager = roofline(arch, get_hardware("a100-80gb"), "eager").memory
    assert eager.encode_per_tile_token_squared == 16 * 9  # 16 heads x 9 bytes per score
    one_photo = [arch.vision_patch_tokens(4032, 3024), arch.tile_token_squares(4032, 3024)]
    assert one_photo == [10 * 1024, 10 * 1024 ** 2]
    assert eager.encode_activation(*one_photo) - flash.encode_activation(*one_photo) == 16 * 9 * 10 * 1024 ** 2
    with pytest.raises(ValueError, match="attention must be one of"):
        roofline(arch, get_hardware("a100-80gb"), "paged")


def test_instance_layouts():
    model = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"))
    usable = 80e9 * 0.9
    encode = model.instance_memory("encode")
    assert encode.kv_tokens == 0 and encode.activation == pytest.approx(usable - 0.936e9 - RUNTIME_RESERVE_BYTES)
    prefill = model.instance_memory("prefill", prefill_budget=16384)
    assert prefill.activation == pytest.approx(model.memory.prefill_activation(16384))
    assert prefill.kv_tokens == int((usable - 15.2e9 - RUNTIME_RESERVE_BYTES - prefill.activation) // 57344)
    # a bundled GPU reserves activations for its encode batch of the largest images: its KV pool shrinks
    pools = [model.instance_memory("encode+prefill", encode_batch=n).kv_tokens for n in (4, 16, 64)]
    assert pools[0] > pools[1] > pools[2] > 0
    assert model.instance_memory("encode+prefill", encode_batch=1024).problem().startswith(
        "encode+prefill: weights 16.1 GB + runtime 1.5 GB + activation reserve")


def test_what_memory_allows_for_the_papers_photos():
    model = roofline(get_architecture("minicpm-v-2.6"), get_hardware("a100-80gb"))
    per_image = model.memory.encode_activation(10 * 1024, 0)
    epd = memory_limits(model, ServingConfig("epd", 6, 1, 1), PHOTO, 22, 10)
    assert epd.encode_batch == int((72e9 - 0.936e9 - RUNTIME_RESERVE_BYTES) // per_image)
    assert epd.images_per_request_by_context == (32768 - 22 - 10) // 640 == 51
    bundled = memory_limits(model, ServingConfig("bundled", 7, decode=1), PHOTO, 22, 10)
    # the bundled GPU must keep the prompt's KV next to the vision activations: fewer images per forward
    assert 0 < bundled.encode_batch < epd.encode_batch
    free = 72e9 - 16.136e9 - RUNTIME_RESERVE_BYTES
    assert bundled.encode_batch == int(free // (per_image + 640 * 57344))
    assert epd.images_per_request > bundled.images_per_request > 0
