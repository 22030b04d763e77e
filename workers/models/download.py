"""Model delivery: fetch a hub model at process start, each stage only the
safetensors shards that hold its tensors.

Enabled by `EPD_MODEL_DOWNLOAD=1` (the operator sets it on every pod whose
model is not on a weights PVC). The revision comes from `EPD_MODEL_REVISION`
(a commit pins it; a branch or tag is resolved once per start), the token from
`HF_TOKEN`, the hub from `HF_ENDPOINT`, the cache from `HF_HUB_CACHE` (a
shared PVC, a PVC per pod, or an emptyDir). Files land in the standard
Hugging Face cache, so an interrupted download resumes from its partial file
and a second start downloads nothing.

A stage then loads from a *view*: a directory of links to the config,
tokenizer and processor files and to the stage's shards, with the shard index
cut down to those shards, which every loader reads like a whole model. The
router's view has no weights at all; `colocated` has every shard."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .adapter import UnknownModelError
from .presets import PRESETS, cache_root

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
COMPLETE = ".epd-view-complete"
_prepared: dict[str, Path] = {}  # model id -> this process's view


class ModelDownloadError(UnknownModelError):
    """The hub refused or could not deliver the model; the message says which and why."""


@dataclass(frozen=True)
class StageTensors:
    """Which checkpoint tensors a stage loads: names under `prefixes` (after `renames` map legacy
    checkpoint names to current ones), plus the sources of parameters tied to them."""

    prefixes: tuple[str, ...]
    renames: dict[str, str]
    tied: dict[str, str]

    def wants(self, key: str) -> bool:
        name = next((new + key[len(old):] for old, new in self.renames.items() if key.startswith(old)), key)
        return any(name.startswith(prefix + ".") for prefix in self.prefixes) or name in self.tied_sources

    @property
    def tied_sources(self) -> set[str]:
        return {source for target, source in self.tied.items()
                if any(target.startswith(prefix + ".") for prefix in self.prefixes)}


def needed_shards(weight_map: dict[str, str], tensors: StageTensors) -> list[str]:
    """The shard files holding at least one tensor the stage loads."""
    return sorted({shard for key, shard in weight_map.items() if tensors.wants(key)})


def enabled() -> bool:
    return os.environ.get("EPD_MODEL_DOWNLOAD") == "1"


def prepare(model: str, stage: str) -> Path | None:
    """Download what `stage` needs of a hub model (no-op for presets, local directories, or when
    downloads are off) and remember the view for `resolve_model_dir`."""
    if not enabled() or model in PRESETS or Path(model).expanduser().is_dir():
        return None
    _prepared[model] = fetch(model, stage)
    return _prepared[model]


def prepared(model: str) -> Path | None:
    """This process's view of a downloaded model; without one (a router), fetch its light files."""
    if model not in _prepared and enabled():
        prepare(model, "router")
    return _prepared.get(model)


def fetch(repo: str, stage: str, revision: str = "") -> Path:
    """The stage's view of `repo` at `revision` (default: $EPD_MODEL_REVISION, else main)."""
    revision = revision or os.environ.get("EPD_MODEL_REVISION") or "main"
    if COMMIT.match(revision) and (view_dir(repo, revision, stage) / COMPLETE).exists():
        return view_dir(repo, revision, stage)  # pinned and complete: not even a request
    hub = _Hub(repo)
    commit, files = hub.listing(revision)
    view = view_dir(repo, commit, stage)
    if (view / COMPLETE).exists():
        return view
    light = [f for f in files if "/" not in f and not f.endswith(WEIGHT_SUFFIXES)]
    local = {name: hub.download(name, commit) for name in light}
    shards = _stage_shards(repo, stage, files, local)
    local.update({name: hub.download(name, commit) for name in shards})
    _write_view(view, local, shards)
    return view


def view_dir(repo: str, commit: str, stage: str) -> Path:
    return cache_root() / "views" / repo.replace("/", "--") / commit / stage


def _stage_shards(repo: str, stage: str, files: list[str], local: dict[str, Path]) -> list[str]:
    if stage == "router":
        return []
    if INDEX not in local:
        single = [f for f in files if f.endswith(".safetensors") and "/" not in f]
        if not single:
            raise ModelDownloadError(f"{repo} has no safetensors weights (only safetensors checkpoints load)")
        return single  # one file: nothing to select
    weight_map = json.loads(local[INDEX].read_text())["weight_map"]
    if stage == "colocated":
        return sorted(set(weight_map.values()))
    return needed_shards(weight_map, stage_tensors(local["config.json"].parent, stage))


def stage_tensors(model_dir: Path, stage: str) -> StageTensors:
    """What the model family's adapter says the stage loads (encode: vision tower + projector;
    prefill and decode: the language model)."""
    from . import load_adapter

    adapter = load_adapter(str(model_dir))
    factories = adapter.vision_factories() if stage == "encode" else adapter.language_factories()
    return StageTensors(tuple(factories), dict(adapter.checkpoint_renames), adapter.tied_parameters())


def _write_view(view: Path, local: dict[str, Path], shards: list[str]) -> None:
    view.mkdir(parents=True, exist_ok=True)
    for name, path in local.items():
        if name == INDEX:
            continue
        link = view / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path.resolve())
    if INDEX in local:
        index = json.loads(local[INDEX].read_text())
        kept = set(shards)
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v in kept}
        (view / INDEX).write_text(json.dumps(index))
    (view / COMPLETE).touch()


class _Hub:
    """huggingface_hub calls with their failures turned into one clear ModelDownloadError."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.token = os.environ.get("HF_TOKEN") or None
        self.cache_dir = os.environ.get("HF_HUB_CACHE") or None

    def listing(self, revision: str) -> tuple[str, list[str]]:
        from huggingface_hub import HfApi

        info = self._call(lambda: HfApi(endpoint=self.endpoint, token=self.token).model_info(
            self.repo, revision=revision), revision)
        return info.sha, [sibling.rfilename for sibling in info.siblings or []]

    def download(self, filename: str, commit: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(self._call(lambda: hf_hub_download(self.repo, filename, revision=commit, cache_dir=self.cache_dir,
                                                       endpoint=self.endpoint, token=self.token), commit))

    def _call(self, call, revision: str):
        from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

        where = f"{self.repo}@{revision} from {self.endpoint or 'https://huggingface.co'}"
        try:
            return call()
        except RevisionNotFoundError as exc:
            raise ModelDownloadError(f"cannot download {where}: no such revision") from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise ModelDownloadError(
                    f"cannot download {where}: the hub refused the credentials (HTTP {status}); "
                    f"{'HF_TOKEN is wrong or lacks access to the repository' if self.token else 'no HF_TOKEN is set'}"
                    " (spec.model.secret names the Secret holding it)") from exc
            raise ModelDownloadError(f"cannot download {where}: HTTP {status}: {exc}") from exc
        except OSError as exc:  # connection refused, DNS, disk full
            raise ModelDownloadError(f"cannot download {where}: {type(exc).__name__}: {exc}") from exc
