"""Model delivery against a local server speaking the hub's file API
(HF_ENDPOINT), serving the tiny-llava preset re-written as a sharded
checkpoint: each stage downloads only the shards holding its tensors, a second
start downloads nothing, an interrupted download resumes, and a wrong token is
a clear error (in the worker's log too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from e2e.checkpoints import REPO, sharded_checkpoint, start_worker
from e2e.hub_server import HubServer
from epd.workers.models import download, load_adapter

TOKEN = "hf_good_token"
# hub checkpoints (and transformers 5 on save) use the legacy names; current ones start with `model.`
VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return sharded_checkpoint(tmp_path_factory.mktemp("repo"))


@pytest.fixture
def hub(sharded, tmp_path, monkeypatch):
    with HubServer(REPO, sharded, TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("EPD_MODEL_CACHE", str(tmp_path / "epd"))
        monkeypatch.setenv("EPD_MODEL_DOWNLOAD", "1")
        monkeypatch.delenv("EPD_MODEL_REVISION", raising=False)
        monkeypatch.setattr(download, "_prepared", {})
        yield server


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def shards_holding(directory: Path, vision: bool) -> set[str]:
    return {shard for key, shard in weight_map(directory).items() if key.startswith(VISION) == vision}


def test_encode_fetches_only_the_vision_shards_and_loads_from_them(hub, sharded):
    every = set(weight_map(sharded).values())
    wanted = shards_holding(sharded, vision=True)
    assert len(every) >= 4 and wanted < every  # the checkpoint really is split, and encode needs a part of it
    view = download.fetch(REPO, "encode")
    assert {f for f in hub.downloads() if f.endswith(".safetensors")} == wanted
    assert set(weight_map(view).values()) == wanted
    assert sum((sharded / s).stat().st_size for s in wanted) < sum((sharded / s).stat().st_size for s in every)
    vision = load_adapter(str(view)).load_vision()
    reference = load_adapter(str(sharded)).load_full()
    for prefix, module in vision.parts.items():
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, reference.state_dict()[f"{prefix}.{name}"]), (prefix, name)


def test_prefill_fetches_the_language_shards_and_the_router_no_weights(hub, sharded):
    view = download.fetch(REPO, "prefill")
    assert set(weight_map(view).values()) == shards_holding(sharded, vision=False)
    load_adapter(str(view)).load_language()
    before = len(hub.downloads())
    router = download.fetch(REPO, "router")
    assert not [f for f in hub.downloads()[before:] if f.endswith(".safetensors")]
    assert not list(router.glob("*.safetensors")) and (router / "config.json").exists()


def test_a_second_start_downloads_nothing_and_a_pinned_one_asks_nothing(hub):
    download.fetch(REPO, "encode")
    first = len(hub.requests)
    download.fetch(REPO, "encode")  # revision main: one listing to learn the commit, no file
    assert [r.path for r in hub.requests[first:]] == [f"/api/models/{REPO}/revision/main"]
    count = len(hub.requests)
    download.fetch(REPO, "encode", revision=hub.commit)
    assert len(hub.requests) == count


def test_an_interrupted_download_resumes_where_it_stopped(hub, sharded, monkeypatch):
    # The hub client writes to disk (and so can resume from) whole chunks of 10 MB; shrink them so a
    # shard of this tiny checkpoint is several chunks and a cut leaves some of it on disk.
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 4096)
    shard = min(shards_holding(sharded, vision=True))
    hub.cut_short.add(shard)
    view = download.fetch(REPO, "encode")
    gets = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith("/" + shard)]
    half = (sharded / shard).stat().st_size // 2
    assert len(gets) == 2 and gets[0] is None, gets
    resumed_at = int(gets[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= half and resumed_at % 4096 == 0  # what had reached the disk is not fetched again
    assert (view / shard).read_bytes() == (sharded / shard).read_bytes()


def test_prepare_serves_resolve_model_dir_only_when_asked(hub, monkeypatch):
    from epd.workers.models import resolve_model_dir

    assert download.prepare("tiny-llava", "encode") is None  # presets are built locally
    view = download.prepare(REPO, "encode")
    assert resolve_model_dir(REPO) == view
    monkeypatch.setenv("EPD_MODEL_DOWNLOAD", "0")
    monkeypatch.setattr(download, "_prepared", {})
    assert download.prepare(REPO, "encode") is None


def test_a_wrong_token_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(download.ModelDownloadError, match=r"refused the credentials \(HTTP 401\)"):
        download.fetch(REPO, "encode")
    assert not hub.downloads()


def test_the_worker_exits_with_the_reason_in_its_log(hub, tmp_path):
    result = start_worker(hub.url, "hf_wrong", tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"epd worker: cannot download {REPO}@main from {hub.url}: the hub refused the "
                           f"credentials (HTTP 401); HF_TOKEN is wrong"), result.stderr[-2000:]
