"""Where experiments live: a local folder or a bucket URI, and the experiment folder inside it.

Not a refusal module: export, console and the sweep read locations through here,
and preflight.py decides which of them a sweep may use.

Reading back: nothing in an experiment folder is trusted. Its files are read through
`read_bytes` (a regular file inside the folder, reached without following any link,
within a size bound), and what they hold is checked before it is used.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import sys
import threading
from contextlib import contextmanager, suppress
from reprlib import Repr

SCHEMES = ("s3", "gs")  # bucket URIs a sweep, export and report accept (through pyarrow's filesystems)


def scheme_problem(uri: str) -> str | None:
    """Why `uri` is no place for experiments (an unknown scheme, no bucket), or None for a folder or a good URI."""
    if not is_remote(uri):
        return None
    allowed = "allowed: a local folder, or " + " or ".join(f"{s}://BUCKET/PATH" for s in SCHEMES)
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in SCHEMES:
        return f"the scheme {scheme}:// is not supported; {allowed}"
    if not rest.split("?")[0].split("/")[0]:
        return f"it names no bucket; {allowed}"
    return None


def is_remote(path: str) -> bool:
    return "://" in path


def without_query(uri: str) -> str:
    """A bucket URI without its query (an endpoint override, its credentials); a local path as it is: a `?` is a
    letter like any other in a folder's name."""
    return uri.split("?")[0] if is_remote(uri) else uri


def last_name(uri: str) -> str:
    """The last name of a path or URI (an experiment's name)."""
    return without_query(uri).rstrip("/").rsplit("/", 1)[-1]


REACH_TIMEOUT_S = 15.0  # a bucket that has not answered by then is taken as unreachable
SLOWEST_WRITE = 2**20  # bytes a second: a bucket writing a file slower than this is taken as not answering


def upload_limit(size: int) -> float:
    """Seconds an upload of `size` bytes to a bucket may take, at a pace no bucket that answers falls below."""
    return REACH_TIMEOUT_S + size / SLOWEST_WRITE


stalled: list[str] = []  # calls within() gave up on, still running: the process's exit would wait for them


def within(seconds: float, fn):
    """fn() in a daemon thread; TimeoutError if it has not returned by then. A bucket client may retry its
    credential lookup for minutes (gs:// without credentials does), which would otherwise hold the command: every
    call on a bucket (reach, list_folder, open_file and each read) goes through here."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        stalled.append(worker.name)
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def reach(uri: str):
    """(pyarrow filesystem, path) of a folder or bucket URI, with the bucket asked once within REACH_TIMEOUT_S."""
    import pyarrow.fs

    problem = scheme_problem(uri)
    if problem:
        raise ValueError(problem)
    if not is_remote(uri):
        return pyarrow.fs.FileSystem.from_uri(uri)

    def ask():
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.get_file_info(path)
        return fs, path

    return within(REACH_TIMEOUT_S, ask)


def as_given(path) -> str:
    """`path` absolute but not made normal: os.path.abspath takes a/link/.. for a, as text, where the kernel takes
    the folder above where the link leads. The working folder is asked for only where `path` is relative (it may
    be gone)."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def not_utf8(path: str) -> str | None:
    """`path` spelled as bytes, where those are not the UTF-8 of its text: Ray and pyarrow take a path's text as
    UTF-8, Python's os in the locale's encoding (Latin-1, say), so the two would name different folders."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # (text the locale's encoding cannot spell: from the Python API)
        return ascii(path)[1:-1]
    with suppress(UnicodeEncodeError):  # (a byte that is no UTF-8, kept as Python does, as a lone surrogate)
        if raw == path.encode("utf-8"):
            return None
    return str(raw)[2:-1]


def locale_note() -> str:
    """What a refusal of not_utf8 adds where the locale's encoding of paths is not UTF-8."""
    encoding = sys.getfilesystemencoding()
    return "" if encoding.lower().replace("-", "") == "utf8" else f" (and this locale spells paths in {encoding})"


def storage_uri(storage: str) -> str:
    """An absolute local path (Ray rejects relative ones) or the URI as given."""
    # (os.path.realpath: Path.resolve raises RuntimeError on a link loop, which the checks after this name)
    from .settings import expand_user

    return storage if is_remote(storage) else os.path.realpath(expand_user(storage))  # ~nobody: as given


def experiment_uri(root: str, name: str) -> str:
    """`root`/`name`, keeping a URI's query string (an S3 endpoint override) at its end."""
    if not is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    base, sep, query = root.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def missing_folders(path: str) -> list[str]:
    """The folders of `path` that do not exist yet, deepest first: what a refused command must not leave behind."""
    missing = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def make_folders(path) -> None:
    """os.makedirs(path, exist_ok=True), folder by folder from the first missing one: os.makedirs and pathlib
    recurse once a folder, and a path of 1,000 short names (within PATH_MAX) ran past Python's stack."""
    path = os.fspath(path)  # as given, not made normal: the kernel takes a/link/.. through the link, not as a
    for folder in reversed(missing_folders(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))):
        try:
            os.mkdir(folder)
        except OSError:
            if not os.path.isdir(folder):
                raise


def unwritable_in(folder: str, depth: int = 2) -> str | None:
    """The first of `folder` and what lies up to `depth` levels below it that this user cannot write (read-only,
    immutable): in a trial's folder, Tune appends to its files and deletes its checkpoints. None where all can be."""
    level, seen = [folder], 0
    for below in range(depth + 1):
        for path in level:
            if not os.access(path, os.W_OK, follow_symlinks=False):
                return path
        if below == depth:
            break
        nested = []
        for path in level:
            with suppress(OSError), os.scandir(path) as entries:  # a file, or gone meanwhile
                nested += [e.path for e in entries if not e.is_symlink()]
        seen += len(nested)
        if seen > 100_000:  # more than a sweep makes: the rest is not looked at
            break
        level = sorted(nested)
    return None


def remove_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty one: whatever someone else put there meanwhile stays
        except OSError:
            return


def existing_parent(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


DRIVER_LOG = "driver.log"  # in the experiment folder: every line Ray logged on the driver
RESERVE_NAME = ".tune-alexnet-reserve"  # in a local experiment folder: room held back for the last writes
RESERVE_BYTES = 8 * 2**20  # Tune's final state, the last result lines, the tables, the report and its figures


RESUME_STATE_WEIGHTS = (
    5  # a running trial's checkpoint in network sizes: trainer.pt (weights, 2 moments, best) + model.pt
)


def checkpoint_room(weights: int) -> int:
    """Bytes one running trial's checkpoint takes: it holds one, and its next one needs as much again."""
    return RESUME_STATE_WEIGHTS * weights


def room_needed(trials_left: int, running: int, weights: int) -> int:
    """The one formula of the room a sweep needs, up front and as it runs: each trial still to finish keeps its
    best weights, each running trial holds a checkpoint and needs room for its next, and the reserve. The disk
    guard keeps `running * checkpoint_room` free (the next checkpoints); the rest is what the sweep fills in."""
    return trials_left * weights + 2 * running * checkpoint_room(weights) + RESERVE_BYTES


class StorageLost(Exception):
    """The experiment folder was deleted, or turned unwritable, while the sweep ran: one line, exit 1."""

    def __init__(self, message: str, deleted: bool = False):
        super().__init__(message)
        self.deleted = deleted  # Tune's driver then makes the folder again, with what it held


def make_reserve(exp_dir: str, size: int) -> str | None:
    """Hold `size` bytes of the experiment's disk in a file of our own, released when the disk fills or the sweep
    ends, so that a full disk still ends with tables. None where the disk has no such room to hold."""
    path = os.path.join(exp_dir, RESERVE_NAME)
    release_reserve(path)
    try:
        make_folders(exp_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file
    except OSError:
        os.close(fd)
        release_reserve(path)
        return None
    os.close(fd)
    return path


def release_reserve(path: str | None) -> None:
    if path and os.path.lexists(path) and os.path.basename(path) == RESERVE_NAME:
        try:
            os.unlink(path)
        except OSError:
            pass


# --- reading an experiment's files back ------------------------------------------------------------------------
# Size bounds: a file over its bound is refused, never read whole. A 100-epoch trial's result.json is ~150 KB.
RESULT_FILE = "result.json"  # a trial's results as Tune writes them, a JSON line each
RESULT_LIMIT = 64 * 2**20  # a trial's result.json
RESULT_LINES = 100_000  # lines of a trial's result.json: one an epoch, and one for each save between two
ERROR_LIMIT = 2**20  # the tail of a trial's error.txt that is read: its last line is the error
STATE_LIMIT = 256 * 2**20  # Tune's experiment_state-*.json
STATE_TRIALS = 20_000  # trials in it (each parsed into a row: ~100 us and a KB apiece); a study has 108
JSON_LIMIT = 2**20  # small JSON side files: the sweep's settings, params.json, model.json, progress.json
NAME_LIMIT = 255  # bytes of one file or folder name (the common file system limit)
TEXT_LIMIT = 4096  # characters of any string read back (the longest path Linux accepts)
INT_LIMIT = 2**63  # integers read back from JSON are below this (int64), or no number (parse_json)


class RefusedFile(OSError):
    """A file of an experiment that is not read: reached through a link, not a regular file, or too large."""


def plain_name(name: str) -> bool:
    """One file or folder name that stays where it is joined: no separator, not '.' or '..', not empty, printable
    (a name that is not UTF-8 is not), at most NAME_LIMIT bytes."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\")
        and name.isprintable()
        and len(name.encode("utf-8")) <= NAME_LIMIT
    )


def list_folder(fs, base: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry of the folder `base` of `fs`. Locally through os.scandir, which (unlike
    pyarrow's listing) takes names that are not UTF-8: they come back with surrogates, which plain_name refuses."""
    import pyarrow.fs

    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        infos = within(REACH_TIMEOUT_S, lambda: fs.get_file_info(pyarrow.fs.FileSelector(base)))
        return [(i.base_name, i.type == pyarrow.fs.FileType.Directory) for i in infos]
    with os.scandir(base) as entries:
        return [(e.name, _is_folder(e)) for e in entries]


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder counts: reading through it is refused, with a reason
    except OSError:
        return False


def read_bytes(fs, base: str, relative: str, limit: int, tail: bool = False) -> bytes:
    """At most `limit` bytes of the regular file `relative` (names joined by '/') inside the folder `base` of the
    pyarrow filesystem `fs`; a larger file raises RefusedFile, or with `tail` gives its last `limit` bytes.

    On a local disk no symbolic link below `base` is followed (one pointing inside the folder is refused too,
    so what is read is always inside it) and only a regular file is opened: a FIFO cannot block and /dev/zero
    cannot fill memory. In a bucket, which has neither, the names and the size are checked before reading.
    A file that is not there raises FileNotFoundError."""
    with open_file(fs, base, relative, None if tail else limit) as (f, size):
        if tail:
            f.seek(max(0, size - limit))
            return f.read(limit)
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after it was checked
        raise RefusedFile(f"{relative} is over {_size(limit)}; allowed: at most {_size(limit)}")
    return data


def read_json(fs, base: str, relative: str, limit: int):
    """The JSON value of a file read as read_bytes reads it, parsed by parse_json; ValueError names the file."""
    data = read_bytes(fs, base, relative, limit)
    try:
        return parse_json(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # undecodable, not JSON, or nested beyond Python's stack
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise ValueError(f"{relative} is not JSON ({reason}); allowed: the JSON this package writes") from None


def parse_json(text: str):
    """json.loads, except that an integer no int64 holds comes back as a HugeInt, which is no number: every check
    downstream refuses it by its field's name, and none meets an integer that no float comparison takes."""
    return json.loads(text, parse_int=_int_or_huge)


class HugeInt:
    """An integer of INT_LIMIT or more read back from JSON, kept as its digits."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"{self.digits[:20]}... ({len(self.digits.lstrip('-'))} digits)"

    __str__ = __repr__


def _int_or_huge(digits: str) -> int | HugeInt:
    if len(digits.lstrip("-")) > len(str(INT_LIMIT)) or abs(int(digits)) >= INT_LIMIT:
        return HugeInt(digits)
    return int(digits)


def check_file(fs, base: str, relative: str) -> int:
    """The size of the regular file `relative` inside `base`, checked as read_bytes checks it, without reading it."""
    with open_file(fs, base, relative, None) as (_, size):
        return size


@contextmanager
def open_file(fs, base: str, relative: str, limit: int | None):
    """(binary file, size) of `relative` inside `base`, checked as read_bytes describes; `limit` None: any size."""
    import pyarrow.fs

    parts = relative.split("/")
    if not all(plain_name(p) for p in parts):
        raise RefusedFile(f"{relative!r} is not a path inside the experiment; allowed: names without '..' or '/'")
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        fd = _open_local(base, parts, relative)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            _check_kind(st.st_mode, relative, regular=True)
            _check_size(st.st_size, relative, limit)
            yield f, st.st_size
        return
    path = "/".join([base.rstrip("/"), *parts] if base else parts)
    info = within(REACH_TIMEOUT_S, lambda: fs.get_file_info(path))
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(errno.ENOENT, f"{relative} is missing", path)
    if info.type != pyarrow.fs.FileType.File:
        raise RefusedFile(f"{relative} is not a regular file; allowed: a regular file inside the experiment")
    _check_size(info.size, relative, limit)
    with within(REACH_TIMEOUT_S, lambda: fs.open_input_file(path)) as f:
        yield io.BufferedReader(_BoundedReads(f)), info.size


READ_CHUNK = 8 * 2**20  # bytes of a bucket's file asked for at once, each within REACH_TIMEOUT_S


class _BoundedReads(io.RawIOBase):
    """A file in a bucket whose every read ends within REACH_TIMEOUT_S, as the first look at the bucket does: a
    client may wait for minutes on a stalled connection or a slow trickle. Reads of READ_CHUNK at most, so the
    bound is on each piece, not on a large file as a whole."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), READ_CHUNK)
        data = within(REACH_TIMEOUT_S, lambda: self.f.read(wanted))
        buffer[: len(data)] = data
        return len(data)


def _open_local(base: str, parts: list[str], relative: str) -> int:
    """A descriptor of base/parts, opened one name at a time below `base` without following a link."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # `base` itself is the caller's own path
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        try:
            _check_kind(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode, "/".join(parts[: i + 1]), last)
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            child = os.open(part, flags, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # it was swapped for a link or a file meanwhile
                raise RefusedFile(f"{relative} changed while it was opened; allowed: a folder at rest") from None
            raise
        finally:
            os.close(fd)
        fd = child
    return fd


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFREG: "a regular file",
}


def _check_kind(mode: int, name: str, regular: bool) -> None:
    wanted = stat.S_IFREG if regular else stat.S_IFDIR
    if stat.S_IFMT(mode) != wanted:
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise RefusedFile(f"{name} is {kind}; allowed: {_KINDS[wanted]} inside the experiment, not a link")


def _check_size(size: int, relative: str, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise RefusedFile(f"{relative} is {_size(size)}; allowed: at most {_size(limit)}")


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n and n % 2**20 == 0 else f"{n:,} bytes"


def first_line(exc: BaseException) -> str:
    """An error's message, in one line of at most 200 characters (its type where it has none), its secrets hidden
    before it is cut."""
    from .settings import clipped

    return clipped((str(exc).strip().splitlines() or [type(exc).__name__])[0], 200)


def shown(value) -> str:
    """A value read back, as its JSON spelling, short enough for an error line."""
    if isinstance(value, dict | list):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} ({len(value)} items)"
    text = json.dumps(value) if isinstance(value, bool | float | str | type(None)) else str(value)
    return text if len(text) <= 40 else text[:40] + "..."


class _Brief(Repr):
    """reprlib's bounded spelling, but for a tensor, which it spelled whole: one of 6**10 numbers, which a stride of
    0 keeps in a few bytes of a file, took minutes and gigabytes."""

    def repr_Tensor(self, x, level):  # (reprlib's name for the spelling of a type named Tensor)
        try:
            return f"tensor{tuple(x.shape)}"
        except RuntimeError:  # a nested tensor has no one shape
            return "tensor"


brief = _Brief().repr  # a value from a file, in a line: bounded, whatever it holds
