"""Loads only the parameters a stage needs.

A stage declares the parts it owns as {checkpoint prefix: module factory}. The
factories run without weight initialisation (allocation only; buffers computed
in constructors stay correct), then each part reads just its own tensors from
the safetensors files. Encode therefore never holds the language model, and
prefill/decode never hold the vision tower."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.initialization import no_init_weights

ModuleFactory = Callable[[], nn.Module]


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def build_parts(factories: Mapping[str, ModuleFactory], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, nn.Module]:
    """Allocate each part on `device` without running weight initialisation."""
    parts = {}
    with torch.device(device), no_init_weights():
        for prefix, factory in factories.items():
            parts[prefix] = factory().to(dtype=dtype)
    return parts


def load_parts(parts: Mapping[str, nn.Module], model_dir: Path,
               renames: Mapping[str, str] = {}, tied: Mapping[str, str] = {}) -> None:
    """Fill `parts` from the checkpoint, reading only tensors under their prefixes.

    `renames` maps legacy checkpoint prefixes to current ones; `tied` maps a
    parameter missing from the checkpoint to the one it is tied to."""
    wanted: dict[str, dict[str, tuple[Any, str, Path]]] = {prefix: {} for prefix in parts}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = _rename(key, renames)
                prefix = _owner(name, parts)
                if prefix is not None:
                    wanted[prefix][name[len(prefix) + 1:]] = (f, key, path)
                for target, source in tied.items():
                    owner = _owner(target, parts) if name == source else None
                    if owner is not None:
                        wanted[owner].setdefault(target[len(owner) + 1:], (f, key, path))
            for prefix, module in parts.items():
                _copy_from(f, path, module, wanted[prefix])
    for prefix, module in parts.items():
        expected = set(module.state_dict())
        missing = expected - set(wanted[prefix])
        if missing:
            raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors of {prefix!r}, "
                             f"e.g. {sorted(missing)[:3]}")


def _rename(key: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _owner(name: str, parts: Mapping[str, nn.Module]) -> str | None:
    """The longest part prefix that `name` lies under."""
    owners = [prefix for prefix in parts if name.startswith(prefix + ".")]
    return max(owners, key=len) if owners else None


def _copy_from(f, path: Path, module: nn.Module, entries: dict) -> None:
    state = module.state_dict()
    with torch.no_grad():
        for local, (_, key, src) in entries.items():
            if src != path or local not in state:
                continue
            tensor = f.get_tensor(key)
            target = state[local]
            if target.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))


def parameter_bytes(factories: Mapping[str, ModuleFactory], dtype: torch.dtype) -> int:
    """Bytes of the parameters the factories would allocate, counted on the meta device."""
    total = 0
    with torch.device("meta"):
        for factory in factories.values():
            module = factory().to(dtype=dtype)
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total
