"""A hub repository to download from: the tiny-llava preset re-written as a
sharded checkpoint (as hub models are), and `epd worker` started on it the way
a pod starts it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from epd.workers.models.presets import materialize

REPO = "test-org/tiny-llava-sharded"


def sharded_checkpoint(out: Path) -> Path:
    """tiny-llava in `out` as many small shards plus their index (legacy tensor names, like hub LLaVA)."""
    from transformers import LlavaForConditionalGeneration

    preset = materialize("tiny-llava")
    out.mkdir(parents=True, exist_ok=True)
    for item in preset.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy(item, out / item.name)
    LlavaForConditionalGeneration.from_pretrained(preset).save_pretrained(out, max_shard_size="150KB")
    return out


def start_worker(hub_url: str, token: str, scratch: Path, stage: str = "encode") -> subprocess.CompletedProcess:
    """`epd worker` with the environment the operator gives a pod that downloads its model."""
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_TOKEN": token, "HF_HUB_CACHE": str(scratch / "hub"),
           "EPD_MODEL_CACHE": str(scratch / "epd"), "EPD_MODEL_DOWNLOAD": "1",
           "EPD_REDIS_URL": "redis://127.0.0.1:1/0"}
    return subprocess.run([sys.executable, "-P", "-m", "epd.cli", "worker", "--role", stage, "--model", REPO],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
