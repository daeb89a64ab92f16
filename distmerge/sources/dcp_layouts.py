"""Where each trainer that saves with torch DCP puts the model, and the wrapper key in front of its names.

One table (WRITERS), taken from the writers' own saving code:
- accelerate (`utils/fsdp_utils.py: save_fsdp_model`, FSDP SHARDED_STATE_DICT): CKPT/pytorch_model_fsdp_K/
  = dcp.save({"model": state_dict}), one per prepared model K, beside optimizer_K/ (dcp.save({"optimizer":
  ...})), scheduler.bin, random_states_R.pkl (Accelerator.save_state; CKPT is checkpoint_N under
  automatic naming) or scheduler.pt, rng_state_R.pth, trainer_state.json (the HF Trainer's checkpoint-N).
- NeMo-RL (`nemo_rl/utils/native_checkpoint.py`, DTensor policy worker v1): step_N/policy/weights =
  dcp.save({"model": ModelState}), beside policy/optimizer ({"optim": ...}), policy/tokenizer/; step_N/
  also holds config.yaml, training_info.json, train_dataloader.pt. Worker v2 (nemo_automodel's
  Checkpointer, model_save_format torch_save) saves the bare state dict into policy/weights/model and the
  optimizer into policy/optimizer/optim. PPO saves a value model beside the policy: step_N/value/weights.
  A save in progress is tmp_step_N, renamed to step_N when complete.
- torchtune (`training/checkpointing/_checkpointer.py: DistributedCheckpointer`): OUT/dist_epoch_N
  (0.6.x; epoch_N or step_N after it) = dcp.save({"model": ..., "optimizer": ..., "seed": ..., ...})
  under torchtune's own module names (see torchtune.TORCHTUNE_TO_META).

`locate(source)` turns the directory a user naturally passes (the checkpoint folder, the model folder,
NeMo-RL's step_N/ or its policy/) into the DCP directory to read, and refuses what is ambiguous or
unfinished with the fix. It reads directory listings only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import MergeError
from ..paths import check_dir

METADATA = ".metadata"


@dataclass(frozen=True)
class Writer:
    """One trainer's DCP layout."""

    name: str                   # shown in the catalogue notes
    wrapper: str | None         # the key the model's state dict was saved under ("model"), None: bare names
    beside: tuple[str, ...]     # regexes of what the writer saves next to the model directory (named in notes)


ACCELERATE = Writer("accelerate (FSDP SHARDED_STATE_DICT)", "model",
                    (r"optimizer_\d+", r"scheduler(_\d+)?\.(bin|pt)", r"random_states_\d+\.pkl", r"rng_state_\d+\.pth",
                     r"sampler(_\d+)?\.bin", r"trainer_state\.json"))
NEMO_RL = Writer("NeMo-RL (DTensor policy, native_checkpoint)", "model", (r"optimizer", r"tokenizer"))
NEMO_RL_V2 = Writer("NeMo-RL (DTensor policy v2, nemo_automodel torch_save)", None, ())
TORCHTUNE = Writer("torchtune (DistributedCheckpointer)", "model", ())
WRITERS = (ACCELERATE, NEMO_RL, NEMO_RL_V2, TORCHTUNE)

ACCELERATE_MODEL = re.compile(r"^pytorch_model_fsdp_\d+$")
NEMO_RL_ROLES = ("policy", "value")          # the models a NeMo-RL step may hold
NEMO_RL_UNFINISHED = re.compile(r"^tmp_step_\d+$")
TORCHTUNE_STEP = re.compile(r"^(dist_epoch|epoch|step)_(\d+)$")


@dataclass(frozen=True)
class Located:
    """The DCP directory to read for SOURCE, the writer that saved it (None: plain DCP), and what was found."""

    ckpt: str
    writer: Writer | None
    notes: tuple[str, ...] = ()


def _is_dcp(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA)) and not os.path.isfile(os.path.join(path, "metadata.json"))


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _beside(model_dir: str, writer: Writer) -> list[str]:
    """The entries next to the model directory that the writer saves there (not read)."""
    parent = os.path.dirname(os.path.abspath(model_dir))
    patterns = [re.compile(f"^{p}$") for p in writer.beside]
    return [e for e in _listdir(parent) if any(p.match(e) for p in patterns)]


def _found(model_dir: str, writer: Writer, source: str) -> Located:
    where = f" in {os.path.relpath(model_dir, source)}/" if model_dir != source else ""
    notes = [f"recognised {writer.name}: the model{where}"]
    beside = _beside(model_dir, writer)
    if beside:
        notes.append(f"beside it, not read: {', '.join(beside)}")
    return Located(model_dir, writer, tuple(notes))


def _accelerate(source: str) -> Located | None:
    """accelerate's model directory, or the checkpoint folder that holds exactly one."""
    if ACCELERATE_MODEL.match(os.path.basename(os.path.abspath(source))) and _is_dcp(source):
        return _found(source, ACCELERATE, source)
    models = [e for e in _listdir(source) if ACCELERATE_MODEL.match(e) and _is_dcp(os.path.join(source, e))]
    if len(models) > 1:
        raise MergeError(f"{source} holds {len(models)} accelerate models ({', '.join(models)}: one per model "
                         f"passed to accelerator.prepare); pass the one to merge, e.g. --source "
                         f"{os.path.join(source, models[0])}")
    return _found(os.path.join(source, models[0]), ACCELERATE, source) if models else None


def _nemo_rl_weights(weights: str, source: str) -> Located | None:
    """NeMo-RL's policy/weights (v1) or policy/weights/model (v2)."""
    if _is_dcp(weights):
        return _found(weights, NEMO_RL, source)
    if _is_dcp(os.path.join(weights, "model")):
        return _found(os.path.join(weights, "model"), NEMO_RL_V2, source)
    iterations = [e for e in _listdir(weights) if e.startswith("iter_")]
    if iterations:
        raise MergeError(f"{weights} is NeMo-RL's Megatron backend (a Megatron checkpoint in iter_*/); pass that "
                         f"directory, e.g. --source {os.path.join(weights, iterations[-1])}")
    model = os.path.join(weights, "model")
    if any(e.endswith(".safetensors") for e in _listdir(model)):
        raise MergeError(f"{model} holds safetensors (NeMo-RL's model_save_format: safetensors), not DCP; they are "
                         "HF-named already (with save_consolidated, a complete HF checkpoint is in its consolidated/)")
    return None


def _nemo_rl(source: str) -> Located | None:
    """NeMo-RL's step_N/, its policy/ (or value/), or policy/weights itself."""
    name = os.path.basename(os.path.abspath(source))
    if NEMO_RL_UNFINISHED.match(name):
        raise MergeError(f"{source} is a NeMo-RL checkpoint still being written (tmp_step_N is renamed to step_N "
                         "when the save completes); wait for it, or pass a finished step_N/")
    grandparent, parent = (["", ""] + os.path.abspath(source).split(os.sep))[-3:-1]
    role_weights = name == "weights" and parent in NEMO_RL_ROLES               # policy/weights (v1)
    role_model = name == "model" and parent == "weights" and grandparent in NEMO_RL_ROLES  # policy/weights/model
    if role_weights or role_model:
        if _is_dcp(source):
            return _found(source, NEMO_RL_V2 if name == "model" else NEMO_RL, source)
        return _nemo_rl_weights(source, source)
    if os.path.isdir(os.path.join(source, "weights")):
        return _nemo_rl_weights(os.path.join(source, "weights"), source)
    roles = [r for r in NEMO_RL_ROLES if os.path.isdir(os.path.join(source, r, "weights"))]
    if len(roles) > 1:
        raise MergeError(f"{source} holds NeMo-RL's {' and '.join(roles)} models; pass the one to merge, e.g. "
                         f"--source {os.path.join(source, roles[0])}")
    return _nemo_rl_weights(os.path.join(source, roles[0], "weights"), source) if roles else None


def _torchtune_dir(source: str) -> Located | None:
    """A torchtune output folder: its latest dist_epoch_N/ (what torchtune itself resumes from)."""
    steps = {}
    for entry in _listdir(source):
        m = TORCHTUNE_STEP.match(entry)
        if m and m.group(1) == "dist_epoch" and _is_dcp(os.path.join(source, entry)):
            steps[int(m.group(2))] = entry
    if not steps:
        return None
    latest = steps[max(steps)]
    located = _found(os.path.join(source, latest), TORCHTUNE, source)
    return Located(located.ckpt, TORCHTUNE, located.notes + (f"the latest of {len(steps)} dist_epoch_N/",))


def locate(source: str) -> Located | None:
    """The DCP directory of SOURCE and its writer; None when SOURCE is no DCP save of any kind.
    A plain DCP directory is Located with writer None (torchtune's is recognised by its names). A
    model directory that resolves outside SOURCE (a link out of it) is refused before it is read."""
    found = _locate(source)
    if found is not None:
        check_dir(found.ckpt, source)
    return found


def _locate(source: str) -> Located | None:
    if _is_dcp(source):
        name = os.path.basename(os.path.abspath(source))
        if ACCELERATE_MODEL.match(name):
            return _found(source, ACCELERATE, source)
        if name in ("weights", "model"):
            nemo = _nemo_rl(source)
            if nemo is not None:
                return nemo
        return Located(source, None)
    for find in (_accelerate, _nemo_rl, _torchtune_dir):
        found = find(source)
        if found is not None:
            return found
    return None


def strip_wrapper(names: list[str], writer: Writer, ckpt: str) -> dict[str, str]:
    """The model's names without the writer's wrapper key. A name outside the wrapper means the directory
    is not that writer's save (or was altered): refused, not guessed at."""
    if writer.wrapper is None:
        return {n: n for n in names}
    prefix = writer.wrapper + "."
    outside = [n for n in names if not n.startswith(prefix)]
    if outside:
        raise MergeError(f"{ckpt} is laid out as {writer.name} saves a model, but {len(outside)} of its tensors "
                         f"(e.g. {outside[0]}) are not under the {writer.wrapper!r} key that writer saves the "
                         "model under; pass the model's own DCP directory")
    return {n: n[len(prefix):] for n in names}
