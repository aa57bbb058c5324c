"""What a trial's checkpoint folder holds, and how it is read back: data only, never code.

Every checkpoint holds the run's best weights so far (`model.pt`), the network's
arguments (`model.json`) and the counters (`progress.json`). A *resume* checkpoint,
written every so often, also holds `trainer.pt`: the current weights, the
optimizer's state and the random generators, from which a restarted trial replays
the epochs it lost exactly. A finished run keeps one checkpoint without optimizer
state. Everything is loaded with `weights_only=True`: an experiment folder shared
through a bucket cannot run code on the machine that reads it.

Ray is not needed here: a checkpoint is a local folder, an s3:// (or gs://) URI
that pyarrow can open, or any object with `to_directory()` (a tune.Checkpoint).
"""

from __future__ import annotations

import io
import json
import numbers
import os
import pickle
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .augment import normalize, prepare_eval
from .data import CLASS_NAME_LIMIT, IMAGE_SIZE, PIL_MODES, tile_problem
from .model import AlexNet
from .settings import BOUNDS, NUM_CLASSES, RedactedError, escaped, expand_user, path_problem
from .storage import (
    JSON_LIMIT,
    RefusedFile,
    brief,
    first_line,
    list_folder,
    open_file,
    reach,
    read_json,
    shown,
    storage_uri,
)

MODEL_FILE = "model.pt"  # the best weights so far
MODEL_ARGS_FILE = "model.json"  # AlexNet's arguments, so the folder alone rebuilds the network
PROGRESS_FILE = "progress.json"  # epoch, best accuracy and its epoch, patience counter
TRAINER_FILE = "trainer.pt"  # resume checkpoints only: current weights, optimizer, generators, counters
CHECKPOINT_FILES = (MODEL_FILE, MODEL_ARGS_FILE, PROGRESS_FILE, TRAINER_FILE)
KIND_BEST, KIND_RESUME, KIND_FINAL = "best", "resume", "final"
# What model.json may hold besides `classes`: AlexNet's arguments, each (test, what is allowed). The width bound
# is the sweep's own, so a tampered 40 is refused before it allocates gigabytes.
MODEL_ARGS = {
    "dropout": (lambda v: isinstance(v, bool), "true or false"),
    "batchnorm": (lambda v: isinstance(v, bool), "true or false"),
    "width": (lambda v: BOUNDS["width"].allows(v), BOUNDS["width"].text()),
}
WEIGHTS_SLACK = 2**20  # bytes of model.pt beyond its tensors' own: torch's zip and pickle framing
# The pickle inside a weights or resume file (its data.pkl) names and shapes each tensor: a few KB. torch's
# weights-only unpickler takes much that a sweep never writes: objects nested past Python's C stack (a crash that
# no except catches), and calls of builtins such as bytearray(2**40), gigabytes from a few bytes.
PICKLE_LIMIT = 2**16  # bytes
NESTING_LIMIT = 100  # containers inside containers (a resume state's: under 10)
MEMBERS_LIMIT = 10_000  # files in a checkpoint's archive (a resume state's: a few hundred)
DIRECTORY_ENTRY = 46 + 255 + 64  # bytes of one file's directory entry at most: its record, name, zip64 extras
OBJECTS_LIMIT = 20_000  # objects it makes (a sweep's: a few thousand); each level of nesting is one, however made
# The names a sweep's pickles call (with torch's storage classes, dtypes and layouts, which they name): others that
# torch's weights-only unpickler takes compute from what they are given (Counter iterates a tensor, one rebuilder
# copies it to another dtype), and a 2 KB pickle asked for gigabytes through them.
PICKLE_CALLS = (
    "collections OrderedDict",
    "torch._utils _rebuild_tensor_v2",
    "torch._utils _rebuild_meta_tensor_no_storage",
)


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
        yield Path(expand_user(checkpoint))
        return
    fs, path = reach(checkpoint)
    tmp = tempfile.mkdtemp(prefix="tune-alexnet-ckpt-")
    try:  # file by file, every call on the bucket bounded (storage.within): a stalled bucket is an OSError, not a hang
        for name, is_folder in list_folder(fs, path):
            if not is_folder and name in CHECKPOINT_FILES:
                with open_file(fs, path, name, None) as (f, _), open(os.path.join(tmp, name), "wb") as copy:
                    shutil.copyfileobj(f, copy)
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CheckpointError(RedactedError, ValueError):
    """A checkpoint folder that cannot be loaded: one line naming the file and what is allowed."""


def load_model(checkpoint, device: str | torch.device = "cpu") -> AlexNet:
    """The trained network of a checkpoint (a folder, an s3:// URI or a tune.Checkpoint), ready for inference;
    its `classes` attribute names the outputs.

    Nothing in the folder is trusted: model.json and model.pt must be regular files in it (no link is followed),
    model.json must hold AlexNet's arguments within the bounds a sweep allows (checked before any memory is
    allocated), and model.pt must be no larger than that network's weights and hold them. Anything else, a
    missing file included, raises CheckpointError naming the file. A device this machine lacks raises ValueError."""
    device = _usable(device)
    fs, base, label = _location(checkpoint)
    args, classes = _model_args(fs, base, label)
    with torch.device("meta"):  # the shapes model.json declares, without allocating a byte of them
        expected = AlexNet(**args).state_dict()
    state = _read_weights(fs, base, label, expected, device)
    model = AlexNet(**args)
    model.load_state_dict(state)
    model.classes = classes or tuple(str(i) for i in range(NUM_CLASSES))  # none recorded: each output's index
    return model.to(device).eval()


def _usable(device) -> torch.device:
    """`device` as torch names it, if this machine has it: else the checkpoint's file would be blamed for it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r}: {first_line(exc)}; allowed: 'cpu', or 'cuda' on a machine with a GPU"
        ) from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = f"allowed: 'cpu'{', cuda:0..cuda:' + str(count - 1) if count else ''}"
    if d.type == "cuda" and (d.index or 0) >= count:
        raise ValueError(f"device {device!r}: torch sees {count} CUDA device(s) here; {allowed}")
    if d.type not in ("cpu", "cuda") or d.type == "cpu" and d.index not in (None, 0):
        raise ValueError(f"device {device!r} is not one a network is loaded onto here; {allowed}")
    return torch.device("cpu") if d.type == "cpu" else d  # torch.load knows no 'cpu:0'


def _location(checkpoint) -> tuple:
    """(pyarrow filesystem, folder, its name for messages) of a checkpoint given as a local path, a URI or a
    tune.Checkpoint."""
    import pyarrow.fs

    if hasattr(checkpoint, "filesystem") and hasattr(checkpoint, "path"):  # a tune.Checkpoint
        fs, path = checkpoint.filesystem, checkpoint.path
        if not isinstance(fs, pyarrow.fs.FileSystem):
            raise CheckpointError(f"checkpoint.filesystem: {escaped(repr(fs), 60)}; allowed: a pyarrow FileSystem")
        local = isinstance(fs, pyarrow.fs.LocalFileSystem)
        if why := path_problem(path if local or not isinstance(path, str) else f"{fs.type_name}://{path}"):
            raise CheckpointError(f"checkpoint.path: {why}")
        path = os.fspath(path)  # (a Path, where it is no tune.Checkpoint's own str)
        path = storage_uri(path) if local else path
        return fs, path, path
    if isinstance(checkpoint, bytes):  # a bytes path as os.fspath takes it
        checkpoint = os.fsdecode(checkpoint)
    if why := path_problem(checkpoint):  # (None would be the folder "None")
        raise CheckpointError(f"checkpoint: {why} (or a tune.Checkpoint)")
    checkpoint = os.fspath(checkpoint)
    if "://" in checkpoint:
        label = checkpoint.split("?")[0]
        try:  # bounded as export's reads are: gs:// without credentials would retry for minutes
            return *reach(checkpoint), label
        except (OSError, ValueError, TimeoutError) as exc:
            raise _unreachable(label, exc) from None
    path = storage_uri(checkpoint)  # where the kernel finds it: lnk/.. goes through lnk
    return pyarrow.fs.LocalFileSystem(), path, path


def _unreachable(where: str, exc: BaseException) -> CheckpointError:
    """A bucket that did not answer (each read is bounded by storage.REACH_TIMEOUT_S, as export's are)."""
    return CheckpointError(
        f"{where} cannot be reached ({first_line(exc)}); allowed: a checkpoint folder, or a bucket URI your "
        "credentials can read"
    )


def _closed(where: str, exc: PermissionError) -> CheckpointError:
    return CheckpointError(f"{where} cannot be read ({exc.strerror}: its mode, or its owner, keeps you out)")


def _model_args(fs, base: str, label: str) -> tuple[dict, tuple[str, ...]]:
    """AlexNet's arguments and the class names, from model.json."""
    where = f"{label}/{MODEL_ARGS_FILE}"
    try:
        raw = read_json(fs, base, MODEL_ARGS_FILE, JSON_LIMIT)
    except TimeoutError as exc:
        raise _unreachable(where, exc) from None
    except FileNotFoundError:
        raise CheckpointError(f"{where} is missing; allowed: a checkpoint folder written by a sweep") from None
    except PermissionError as exc:
        raise _closed(where, exc) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if problem := _model_args_problem(raw):
        raise CheckpointError(f"{where}: {problem}")
    return {k: raw[k] for k in MODEL_ARGS}, tuple(raw.get("classes", ()))


def _model_args_problem(raw) -> str | None:
    fields = ", ".join([*MODEL_ARGS, "classes"])
    if not isinstance(raw, dict):
        return f"it holds {shown(raw)}; allowed: a JSON object of {fields}"
    unknown = sorted(set(raw) - {*MODEL_ARGS, "classes"})
    if unknown:
        return f"{unknown[0]!r} is not one of AlexNet's arguments; allowed: {fields}"
    for key, (test, allowed) in MODEL_ARGS.items():
        if key not in raw or not test(raw[key]):
            return f"{key!r} is {shown(raw[key]) if key in raw else 'missing'}; allowed: {allowed}"
    classes = raw.get("classes", [])
    names_ok = isinstance(classes, list) and all(
        isinstance(c, str) and c.isprintable() and 0 < len(c) <= CLASS_NAME_LIMIT for c in classes
    )
    if not names_ok or len(classes) not in (0, NUM_CLASSES):  # one name an output, or none recorded
        return (
            f"'classes' is {shown(classes)}; allowed: a list of {NUM_CLASSES} names (one an output) "
            f"of 1..{CLASS_NAME_LIMIT} characters, or none"
        )
    return None


def _read_weights(fs, base: str, label: str, expected: dict, device) -> dict:
    """model.pt's tensors, read only if the file is no larger than the network model.json describes (plus torch's
    framing), each of the shape that network needs: a mismatch is named before the network is built."""
    where = f"{label}/{MODEL_FILE}"
    limit = _bytes_of(expected) + WEIGHTS_SLACK
    try:
        with open_file(fs, base, MODEL_FILE, limit) as (f, _):
            # Read once, here: each piece from a bucket bounded (torch's reader turns a timeout inside it into another
            # error), and what is checked is what torch loads, whoever may write the file meanwhile.
            f = io.BytesIO(f.read(limit + 1))
        _check_archive(f, limit, where)
        state = plain(torch.load(f, map_location=device, weights_only=True))
    except TimeoutError as exc:
        raise _unreachable(where, exc) from None
    except FileNotFoundError:
        raise CheckpointError(f"{where} is missing; allowed: a checkpoint folder written by a sweep") from None
    except RefusedFile as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except CheckpointError:
        raise
    except PermissionError as exc:
        raise _closed(where, exc) from None
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise CheckpointError(f"{where} is not what torch.save writes ({first_line(exc)})") from None
        raise CheckpointError(
            f"{where} was refused: it holds Python objects besides tensors, and loading them would run code; "
            "allowed: a model.pt of tensors only, as a sweep writes it"
        ) from None
    except Exception as exc:  # a torn or foreign file fails in many ways inside the unpickler
        raise CheckpointError(f"{where} is not what torch.save writes ({first_line(exc)})") from None
    if problem := _shape_problem(state, expected):
        raise CheckpointError(
            f"{where} does not hold the weights of the network {MODEL_ARGS_FILE} describes: {problem}"
        )
    return state


def _shape_problem(state, expected: dict) -> str | None:
    """The first tensor of `expected` that `state` lacks or holds in another shape, named with both shapes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"it holds {type(state).__name__} of other values; allowed: a state_dict of tensors"
    for name, want in expected.items():
        if name not in state:
            return f"tensor {name!r} is missing"
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            return f"tensor {name!r} has shape {tuple(got.shape)}, the network needs {tuple(want.shape)}"
        if got.layout != torch.strided or got.is_meta or got.dtype != want.dtype:  # no data, or not what a sweep saves
            kind = "meta (no data)" if got.is_meta else f"{str(got.layout).split('.')[-1]} {got.dtype}"
            return f"tensor {name!r} is {kind}, the network needs strided {want.dtype}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"tensor {name!r} holds values that are not finite (NaN or infinity)"
    extra = sorted(set(state) - set(expected), key=brief)  # keys of any type: 1 beside 'x' cannot be ordered
    return f"tensor {brief(extra[0])} is not one of the network's" if extra else None


def _check_archive(f, limit: int, where: str) -> None:
    """torch.save writes a zip archive; refuse one whose contents unpack to more than `limit` bytes, or whose
    pickle torch's unpickler should not see (pickle_problem)."""
    import zipfile

    if problem := members_problem(f):
        raise CheckpointError(f"{where} was refused: {problem}; allowed: a {Path(where).name} as a sweep writes it")
    try:
        with zipfile.ZipFile(f) as archive:
            size = sum(i.file_size for i in archive.infolist())
            problem = None if size > limit else archive_problem(archive)
    except (zipfile.BadZipFile, ValueError, EOFError):  # a member that does not unpack (ValueError: not a zip)
        raise CheckpointError(f"{where} is not what torch.save writes (a zip archive)") from None
    if size > limit:
        raise CheckpointError(f"{where} unpacks to {size} bytes; allowed: at most {limit} for this network")
    if problem:
        raise CheckpointError(f"{where} was refused: {problem}; allowed: a {Path(where).name} as a sweep writes it")
    f.seek(0)


def members_problem(f) -> str | None:
    """More files than a torch.save archive holds (one a tensor, and four more), as its end record says, read
    before zipfile builds a record of every file: millions of empty ones took minutes and gigabytes."""
    import zipfile

    end = zipfile._EndRecData(f)
    f.seek(0)
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MEMBERS_LIMIT:
        return f"it holds {end[zipfile._ECD_ENTRIES_TOTAL]:,} files, more than {MEMBERS_LIMIT:,}"
    if end is not None and end[zipfile._ECD_SIZE] > MEMBERS_LIMIT * DIRECTORY_ENTRY:  # zipfile reads it by size
        return f"its directory is {end[zipfile._ECD_SIZE]:,} bytes, more than {MEMBERS_LIMIT:,} files take"
    return None


def archive_problem(archive) -> str | None:
    """What in a torch.save archive's pickle torch's unpickler must not see; None where nothing. `archive`: a
    zipfile.ZipFile over a seekable file, which torch.load then reads from its start."""
    if problem := _layout_problem(archive):
        return problem
    names = [i.filename.lower() for i in archive.infolist()]
    if len(set(names)) != len(names):  # torch finds its members by name whatever the case: which one, it says not
        return "it holds two files of one name but for the case of its letters"
    pickles = [i for i in archive.infolist() if i.filename.lower().endswith("data.pkl")]
    if len(pickles) != 1:
        return f"it holds {len(pickles)} pickles; a torch.save archive holds one"
    if pickles[0].file_size > PICKLE_LIMIT:
        return f"its pickle holds {pickles[0].file_size:,} bytes, more than {PICKLE_LIMIT:,}"
    raw = archive.read(pickles[0])
    return _torch_sees_otherwise(archive, raw) or pickle_problem(raw)


_SATURATED = (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)  # an end record's counts, size and offset, left to zip64's


def _layout_problem(archive) -> str | None:
    """Where Python's zipfile (which checks) and torch's loader (miniz, which loads) could read two archives in one
    file, or unpack more than the file holds. torch.save writes a zip from the file's first byte, every member
    stored, its directory where its end record says, and a zip64 end record right before its locator, which
    points at it. (Each of these, broken, had the two read different pickles: a file not starting as a zip is
    torch's legacy format to torch; zipfile shifts offsets by data it takes as prepended, and reads the zip64
    record before the locator whatever the locator says; miniz inflates what torch never deflates.)"""
    import struct
    import zipfile

    fp = archive.fp
    size = fp.seek(0, os.SEEK_END)
    fp.seek(0)
    if fp.read(4) != b"PK\x03\x04":
        return "it does not start as a zip archive (torch would read it in its legacy format)"
    end = zipfile._EndRecData(fp)
    if end is None or archive.start_dir != end[zipfile._ECD_OFFSET] or end[zipfile._ECD_COMMENT]:
        return "its directory is not where its end record says (a file of two archives, or data before one)"
    at = end[zipfile._ECD_LOCATION]
    if at + zipfile.sizeEndCentDir != size:
        return "it holds data after its end record"
    fp.seek(at)
    plain = struct.unpack("<4s4H2LH", fp.read(zipfile.sizeEndCentDir))[3:7]
    locator = at - zipfile.sizeEndCentDir64Locator
    if locator >= 0 and fp.seek(locator) == locator and fp.read(4) == b"PK\x06\x07":
        fp.seek(locator)
        points_at = struct.unpack(zipfile.structEndArchive64Locator, fp.read(zipfile.sizeEndCentDir64Locator))[2]
        record = locator - zipfile.sizeEndCentDir64
        fp.seek(max(record, 0))
        if points_at != record or fp.read(4) != b"PK\x06\x06":
            return "its zip64 locator does not point at the record before it (a file of two archives)"
        if any(p not in (s, e) for p, s, e in zip(plain, _SATURATED, end[3:7])):
            return "its end record and its zip64 record disagree (a file of two archives)"
    members = archive.infolist()
    if len(members) != end[zipfile._ECD_ENTRIES_TOTAL]:
        return f"its directory lists {len(members)} files, its end record {end[zipfile._ECD_ENTRIES_TOTAL]}"
    if packed := [
        i.filename for i in members if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size
    ]:
        return f"{packed[0]!r} is compressed; torch.save stores every file as it is"
    if (unpacked := sum(i.file_size for i in members)) > size:
        return f"its files unpack to {unpacked:,} bytes, more than the {size:,} of the archive (files that overlap)"
    return None


def _torch_sees_otherwise(archive, raw: bytes) -> str | None:
    """torch's own reader, asked what it sees: the same files of the same sizes, and the same pickle, or the
    archive is refused. (After the checks above, whose sizes bound what it reads here.)"""
    fp = archive.fp
    fp.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(fp)
        records = {name: reader.get_record_size(name) for name in reader.get_all_records()}
        ours = {i.filename.partition("/")[2]: i.file_size for i in archive.infolist()}
        same = records == ours and reader.get_record("data.pkl") == raw
    except Exception:
        same = False
    fp.seek(0)
    return None if same else "torch's reader sees other files in it than Python's zipfile (a file of two archives)"


def pickle_problem(raw: bytes) -> str | None:
    """Read op by op, none of it run: a call of a name outside PICKLE_CALLS, more objects than OBJECTS_LIMIT (made,
    or reached: an object referenced twice counts twice, as whatever walks or hashes it goes through it twice), or
    nesting past NESTING_LIMIT; None where none. Each item on the pickle's stack is tracked as its depth, the name
    it is where it is one, how many objects it reaches, whether it is inside another yet (the pickler fills a
    container before it puts it anywhere, so a pickle that fills one afterwards, its depth and count then untrue
    wherever it was put, is not torch.save's) and whether it is a plain value: a dictionary's keys are (a tensor
    as a key had Python format it whole, hours for a large one that a stride of 0 kept small in the file)."""
    import pickletools

    plain = {pickletools.pyint, pickletools.pylong, pickletools.pyinteger_or_bool, pickletools.pybool,
             pickletools.pyfloat, pickletools.pystring, pickletools.pybytes, pickletools.pybytes_or_str,
             pickletools.pyunicode, pickletools.pynone}  # fmt: skip
    mark = object()
    stack: list = []
    memo: dict = {}
    made = 0
    fills = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}  # change the container below
    not_torch = "its pickle is not what torch.save writes"
    try:
        for op, arg, _ in pickletools.genops(raw):
            name = op.name
            if name in ("INST", "OBJ", "STACK_GLOBAL", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
                return not_torch  # (torch.save's protocol 2 writes none of these; torch's unpickler takes none)
            if name == "GLOBAL" and not _allowed_call(arg):
                return (
                    f"it holds Python objects besides tensors, and loading them would run code ({arg.split(' ')[0]!r} "
                    f"is called: {arg.replace(' ', '.')})"
                )
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "MARK":
                stack.append(mark)
            elif name != "STOP":
                before = op.stack_before
                if pickletools.markobject in before:
                    top = len(stack) - 1 - stack[::-1].index(mark)  # the last mark; ValueError where none is
                    below = top - before.index(pickletools.markobject)
                    popped, stack = stack[below:top] + stack[top + 1 :], stack[:below]
                else:
                    below = len(stack) - len(before)
                    popped, stack = stack[below:], stack[:below]
                if below < 0 or mark in popped:
                    raise IndexError
                if name in fills:  # the container itself, changed: before it was put anywhere, or not torch.save's
                    item, inside = popped[0], popped[1:]
                    if item[3] or (name in ("SETITEM", "SETITEMS") and not all(key[4] for key in inside[::2])):
                        return not_torch
                    item[0] = max(item[0], 1 + max((p[0] for p in inside), default=0))
                    item[2] += sum(p[2] for p in inside)
                else:
                    inside = popped
                    if name == "REDUCE" and popped[0][1] == "collections OrderedDict" and popped[1][2] != 1:
                        return not_torch  # an OrderedDict made from an iterable (a tensor's rows), not filled
                    if name == "DICT" and not all(key[4] for key in popped[::2]):
                        return not_torch
                    made += len(op.stack_after)
                    depth = 1 + max((p[0] for p in popped), default=0)
                    value = not popped and bool(op.stack_after) and op.stack_after[0] in plain
                    item = [depth, arg if isinstance(arg, str) else None, 1 + sum(p[2] for p in popped), False, value]
                for p in inside:
                    p[3] = True
                if item[0] > NESTING_LIMIT:
                    return f"its pickle nests objects more than {NESTING_LIMIT} deep"
                if made > OBJECTS_LIMIT or item[2] > OBJECTS_LIMIT:
                    return f"its pickle makes, or reaches, more than {OBJECTS_LIMIT:,} objects"
                stack += [item] * len(op.stack_after)
    except (ValueError, IndexError, KeyError, TypeError):  # pickletools' ValueError for garbage; what it lacks
        return not_torch
    return None


def _allowed_call(name: str) -> bool:
    """One of PICKLE_CALLS, or a storage class, dtype or layout of torch's (named, not computing anything)."""
    module, _, attr = name.partition(" ")
    if name in PICKLE_CALLS:
        return True
    value = getattr(torch, attr, None) if module == "torch" and attr.isidentifier() else None
    return isinstance(value, torch.dtype | torch.layout) or (isinstance(value, type) and attr.endswith("Storage"))


IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)  # one RGB image, height x width x channels


@torch.inference_mode()
def predict(model: AlexNet, images, batch_size: int = 1000) -> np.ndarray:
    """Class indices for RGB 32x32 images, with the study's test preprocessing; `model.classes[i]` names index i.

    `images`: a uint8 array (N, 32, 32, 3) of 0..255 (any integer array within 0..255 too), a float array of the
    same shape with values in [0, 1] (as `uint8 / 255` gives), or a list of 32x32 PIL images of 8 bits a channel
    (converted to RGB). Anything else (one image without the batch axis, grayscale, channels first, another size,
    floats outside [0, 1], 16-bit or float PIL images, a truncated file) raises ValueError saying what is allowed."""
    out = [logits.argmax(1).cpu() for logits in _logits(model, images, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def predict_proba(model: AlexNet, images, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities, an (N, classes) float32 array whose rows sum to 1 (the softmax of the network's
    outputs); column i is `model.classes[i]`, and its largest entry is what `predict` returns. Takes the images
    `predict` takes."""
    out = [torch.softmax(logits.float(), 1).cpu() for logits in _logits(model, images, batch_size)]
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    return torch.cat(out).numpy() if out else np.zeros((0, outputs), dtype=np.float32)


def _logits(model: AlexNet, images, batch_size: int):
    """The network's outputs for `images`, one batch at a time, in evaluation mode."""
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}; allowed: a whole number >= 1")
    x, batch_size = _as_batch(images), int(batch_size)
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(x), batch_size):
        yield model(_prepare(x[i : i + batch_size], device))


def _as_batch(images) -> np.ndarray:
    """`images` as an (N, 32, 32, 3) array of uint8 (0..255) or float32 (0..1)."""
    if not isinstance(images, np.ndarray):
        images = _from_pil(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        one = " (for one image, pass images[None])" if images.shape == IMAGE_SHAPE else ""
        raise ValueError(f"images have shape {images.shape}; allowed: (N, 32, 32, 3), RGB channels last{one}")
    if images.dtype.kind not in "uif":
        raise ValueError(f"images of {images.dtype}; allowed: integers 0..255 (uint8) or floats in [0, 1]")
    low, high = (images.min(), images.max()) if images.size else (0, 0)
    if np.issubdtype(images.dtype, np.integer) and 0 <= low and high <= 255:
        return images.astype(np.uint8, copy=False)
    if np.issubdtype(images.dtype, np.floating) and 0 <= low and high <= 1:  # NaN fails both comparisons
        return images.astype(np.float32, copy=False)
    raise ValueError(
        f"images of {images.dtype} from {low} to {high}; allowed: integers 0..255 (uint8) or floats in [0, 1]"
    )


def _from_pil(images) -> np.ndarray:
    from PIL import Image

    if isinstance(images, Image.Image):
        raise ValueError("images is one PIL image; allowed: a list of PIL images (pass [image])")
    items = list(images) if isinstance(images, list | tuple) else None
    if items is None or not all(isinstance(im, Image.Image) for im in items):
        raise ValueError(f"images is a {type(images).__name__}; allowed: a numpy array or a list of PIL images")
    rgb = []
    for i, im in enumerate(items):
        if im.size != IMAGE_SHAPE[:2]:
            raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]}; allowed: 32x32 (resize it first)")
        if problem := tile_problem(im):
            raise ValueError(f"image {i} {problem}")
        if im.mode not in PIL_MODES:
            raise ValueError(f"image {i} is of mode {im.mode}, which PIL does not turn into RGB faithfully; allowed: "
                             f"{', '.join(PIL_MODES)} (convert it to 8-bit RGB first)")  # fmt: skip
        try:
            rgb.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - read lazily: a truncated file, a broken PNG chunk (SyntaxError)
            raise ValueError(f"image {i} cannot be read ({first_line(exc)}); allowed: a whole image") from None
    return np.stack(rgb) if rgb else np.zeros((0, *IMAGE_SHAPE), np.uint8)


def _prepare(x: np.ndarray, device) -> torch.Tensor:
    """The study's test preprocessing of a chunk: to [0, 1] (uint8 only), then normalised, channels first."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    return prepare_eval(t) if t.dtype == torch.uint8 else normalize(t)


def read_progress(directory: Path) -> dict | None:
    """The counters of a local checkpoint folder; None where they are missing, unreadable or not a JSON object."""
    import pyarrow.fs

    try:
        progress = read_json(pyarrow.fs.LocalFileSystem(), str(directory), PROGRESS_FILE, JSON_LIMIT)
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def network_bytes(model_args: dict) -> int:
    """Bytes of the weights of AlexNet(**model_args), none of them allocated."""
    with torch.device("meta"):
        return _bytes_of(AlexNet(**model_args).state_dict())


def _bytes_of(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def read_resume(directory: Path, weights: int) -> tuple[dict, dict] | None:
    """(trainer state, best weights) of a resume checkpoint folder of a network of `weights` bytes, on the CPU;
    None if it holds no readable resume state. On the CPU, because the state is checked before use (resume.py)
    and its optimizer's step counts must go where this run's step mode needs them, not where the writing run kept
    them. Each file is read once (what is checked is what torch loads), and only a regular file no larger than
    such a state: the weights (best weights), or them, up to three of the optimizer's tensors a weight and an
    epoch's place (a resume state)."""
    import zipfile

    loaded = []
    limits = {TRAINER_FILE: 4 * weights + 16 * WEIGHTS_SLACK, MODEL_FILE: weights + WEIGHTS_SLACK}
    try:
        for name in (TRAINER_FILE, MODEL_FILE):
            fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > limits[name]:
                    return None
                f = io.BytesIO(f.read(limits[name] + 1))
            if members_problem(f):
                return None
            with zipfile.ZipFile(f) as archive:
                if archive_problem(archive):
                    return None
            f.seek(0)
            loaded.append(plain(torch.load(f, map_location="cpu", weights_only=True)))
    except Exception:  # a torn or corrupt file fails in many ways inside the unpickler
        return None
    return loaded[0], loaded[1]


def plain(value):
    """`value` with each mapping in it a plain dict: a pickle may set attributes on an OrderedDict it builds, which
    shadow the methods the checks and torch's loaders call (`get`, `values`, `keys`) or give torch's module loaders
    a `_metadata` of any kind. (Module versions are all `_metadata` records; a sweep's files hold the current
    modules' tensors, which load the same without them.) Its depth and size are the pickle check's bounds."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in dict.items(value)}
    if type(value) in (list, tuple):
        return type(value)(plain(item) for item in value)
    return value
