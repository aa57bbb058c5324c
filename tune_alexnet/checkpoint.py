"""What a trial's checkpoint folder holds, and how it is read back: data only, never code.

Every checkpoint holds the run's best weights so far (`model.pt`), the network's
arguments (`model.json`) and the counters (`progress.json`). A *resume* checkpoint,
written every so often, also holds `trainer.pt`: the current weights, the
optimiser's state and the random generators, from which a restarted trial replays
the epochs it lost exactly. A finished run keeps one checkpoint without optimiser
state. Everything is loaded with `weights_only=True`: an experiment folder shared
through a bucket cannot run code on the machine that reads it.

Ray is not needed here: a checkpoint is a local folder, an s3:// (or gs://) URI
that pyarrow can open, or any object with `to_directory()` (a tune.Checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .augment import prepare_eval
from .model import AlexNet

MODEL_FILE = "model.pt"  # the best weights so far
MODEL_ARGS_FILE = "model.json"  # AlexNet's arguments, so the folder alone rebuilds the network
PROGRESS_FILE = "progress.json"  # epoch, best accuracy and its epoch, patience counter
TRAINER_FILE = "trainer.pt"  # resume checkpoints only: current weights, optimiser, generators, counters
KIND_BEST, KIND_RESUME, KIND_FINAL = "best", "resume", "final"


def write(
    directory: str | os.PathLike,
    best_weights: dict,
    model_args: dict,
    progress: dict,
    trainer_state: dict | None = None,
    classes: tuple[str, ...] = (),
) -> None:
    d = Path(directory)
    torch.save(best_weights, d / MODEL_FILE)
    (d / MODEL_ARGS_FILE).write_text(json.dumps({**model_args, "classes": list(classes)}))
    (d / PROGRESS_FILE).write_text(json.dumps(progress))
    if trainer_state is not None:
        torch.save(trainer_state, d / TRAINER_FILE)


@contextmanager
def local_copy(checkpoint):
    """A local folder holding the checkpoint's files, for a path, a URI or a tune.Checkpoint."""
    if hasattr(checkpoint, "as_directory"):  # a tune.Checkpoint: Ray copies a remote one and removes the copy
        with checkpoint.as_directory() as d:
            yield Path(d)
        return
    checkpoint = os.fspath(checkpoint)
    if "://" not in checkpoint:
        yield Path(checkpoint).expanduser()
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
    tmp = tempfile.mkdtemp(prefix="tune-alexnet-ckpt-")
    try:
        pyarrow.fs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(checkpoint, device: str | torch.device = "cpu") -> AlexNet:
    """The trained network of a checkpoint (a folder, an s3:// URI or a tune.Checkpoint), ready for inference;
    its `classes` attribute names the outputs."""
    with local_copy(checkpoint) as d:
        args = json.loads((d / MODEL_ARGS_FILE).read_text())
        classes = tuple(args.pop("classes", ()))
        model = AlexNet(**args)
        model.load_state_dict(torch.load(d / MODEL_FILE, map_location=device, weights_only=True))
    model.classes = classes
    return model.to(device).eval()


@torch.inference_mode()
def predict(model: AlexNet, images, batch_size: int = 1000) -> np.ndarray:
    """Class indices for RGB 32x32 images (a uint8 array (N, 32, 32, 3), or PIL images), with the study's test
    preprocessing; `model.classes[i]` names index i."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    model.eval()
    return (
        torch.cat([model(prepare_eval(x[i : i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])
        .cpu()
        .numpy()
    )


def read_progress(directory: Path) -> dict | None:
    try:
        return json.loads((directory / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_resume(directory: Path, device: torch.device) -> tuple[dict, dict] | None:
    """(trainer state, best weights) of a resume checkpoint folder; None if it holds no readable resume state."""
    try:
        state = torch.load(directory / TRAINER_FILE, map_location=device, weights_only=True)
        best = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception:  # a torn or corrupt file fails in many ways inside the unpickler
        return None
    return state, best
