"""Checkpoints: the training state in safetensors plus JSON for everything that is not a tensor.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding ``params.safetensors``, ``optimizer.safetensors``
and ``state.json`` (step, seed, data position, spec). It is written under a temporary name and renamed into place,
and ``checkpoints/latest`` (a one-line file, also replaced atomically) names the newest one, so a crash at any
moment leaves either the old checkpoint or the new one, never half of one.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict, TensorDictBase

CHECKPOINTS = "checkpoints"


def flatten(td: TensorDictBase) -> dict[str, torch.Tensor]:
    """``{"blocks.attn.q.weight": tensor, ...}``, contiguous and on the CPU, as safetensors wants."""
    return {_name(key): td.get(key).detach().cpu().contiguous() for key in td.keys(True, True)}


def _name(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else ".".join(key)


def unflatten_like(
    tensors: dict[str, torch.Tensor], template: TensorDictBase, what: str, cast: bool = True
) -> TensorDict:
    """Rebuild a TensorDict with the structure and batch sizes of ``template``, checking every name and shape;
    each tensor cast to the template's dtype, or kept as stored (``cast=False``)."""
    expected = {_name(key): template.get(key) for key in template.keys(True, True)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    out = template.empty(recurse=True).clear_device_()
    for name, like in expected.items():
        tensor = tensors[name]
        if tensor.shape != like.shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}"
            )
        out.set(tuple(name.split(".")), tensor.to(like.dtype) if cast else tensor)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and a rename."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def save(run_dir: Path, state: TensorDictBase, meta: dict[str, Any]) -> Path:
    """Save ``state`` (``params`` + ``opt``) and ``meta`` as the newest checkpoint of ``run_dir``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    step = int(state["opt", "step"])
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    save_file(flatten(state["params"]), str(staging / "params.safetensors"))
    save_file(flatten(state["opt"]), str(staging / "optimizer.safetensors"))
    (staging / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(staging, final)
    atomic_write_text(root / "latest", final.name + "\n")
    return final


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; a clear error when there is none."""
    pointer = run_dir / CHECKPOINTS / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({pointer} is missing)")
    return run_dir / CHECKPOINTS / pointer.read_text().strip()


def load_meta(checkpoint: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((checkpoint / "state.json").read_text())
    return meta


def load_params(checkpoint: Path, template: TensorDictBase) -> TensorDict:
    """Parameters only (for sampling or export), shaped like ``template`` (e.g. ``init`` on the meta device)."""
    return unflatten_like(load_file(str(checkpoint / "params.safetensors")), template, str(checkpoint))


def load_state(checkpoint: Path, template: TensorDictBase) -> TensorDict:
    """The full training state, shaped like ``template`` (a fresh state of the same model)."""
    params = load_params(checkpoint, template["params"])
    opt = unflatten_like(
        load_file(str(checkpoint / "optimizer.safetensors")), template["opt"], str(checkpoint)
    )
    return TensorDict({"params": params, "opt": opt})


# TEMPORARY: replaced by the integrity branch (issue 19).
def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS / "latest").is_file()


def prune(run_dir: Path, keep: int) -> None:
    root = run_dir / CHECKPOINTS
    current = latest(run_dir).name
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != current:
            shutil.rmtree(old)


def save_for_inspection(run_dir: Path, state: TensorDictBase, name: str, meta: dict[str, Any]) -> Path:
    final = run_dir / CHECKPOINTS / name
    final.mkdir(parents=True, exist_ok=True)
    save_file(flatten(state["params"]), str(final / "params.safetensors"))
    save_file(flatten(state["opt"]), str(final / "optimizer.safetensors"))
    (final / "state.json").write_text(json.dumps(meta, indent=2))
    return final
