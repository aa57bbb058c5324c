"""What the Ray cluster is and how a local one is started: its nodes, the node types its autoscaler can start,
the filesystem a storage folder lies on, and the options of an embedded local Ray.

Facts, not refusals: preflight.py decides what to refuse from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from .settings import home, say
from .storage import as_given, locale_note, not_utf8

log = logging.getLogger("tune_alexnet.cluster")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaling config on the head
# Ray's Unix sockets live below its temp folder, and a socket's path must fit in 107 bytes: at the longest, a
# session folder (its start to the microsecond, then a pid), its sockets and the dashboard's longest-named one.
RAY_SOCKET_TAIL = len("/ray/session_2026-12-05_11-22-56_123456_/sockets/dash_TaskEventsHead")
SOCKET_PATH_MAX = 107

NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "ceph",
    "glusterfs",
    "beegfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "efs",
    "9p",
    "virtiofs",
)


class UnsafeTempDir(Exception):
    """The private folder for a local Ray's sessions exists but is not ours alone."""


def local_ray_options(log_to_driver: bool = True) -> dict:
    """ray.init options of an embedded local Ray that shows other users of the machine nothing: its sessions and
    logs (which hold the environment Tune forwards to trials, cloud secrets included) lie in a folder only this
    user can enter. (Ray's servers listen on every interface whatever it is told, its token guarding them; and
    it makes its own temp folder world-writable, hence the private folder above it.)"""
    _new_private_token()
    if keep_token_private():  # before Ray starts, not only after: its servers take whoever holds the token
        log.warning(
            "Ray's token %s was readable by other users; it is now yours alone (mode 0600). If someone may have "
            "read it, delete it and Ray makes a new one",
            token_path(),
        )
    global _kernel_cache, _ray_tmpdir
    private = private_temp_dir()
    # torch's kernel cache, whose compiled code trials load and run, lies in TMPDIR/torchinductor_USER by default
    # (made even by eager trials): a folder another user may have made first, and swap. In the private folder
    # instead, which Ray's processes take from this environment; a cache the user named stays theirs.
    if os.environ.get(KERNEL_CACHE) in (None, "", _kernel_cache):  # (empty: torch's default, as unset)
        _kernel_cache = os.environ[KERNEL_CACHE] = os.path.join(private, "torchinductor")
    # Ray's lock files (Tune's, around the experiment's state) lie in RAY_TMPDIR, else TMPDIR or /tmp: a folder of
    # another user's there failed a resume halfway, and Tune went on with no trials. In the private folder too.
    if os.environ.get(RAY_TMPDIR) in (None, "", _ray_tmpdir):  # (empty: Ray's lock files in the working folder)
        _ray_tmpdir = os.environ[RAY_TMPDIR] = private
    return {"_temp_dir": os.path.join(private, "ray"), "log_to_driver": log_to_driver}


def folder_settings_problem() -> str | None:
    """A folder for the local Ray's processes given as a relative path (blank space is one): each would keep its
    files below whatever folder it runs in, the working folder of the command among them. And one the user named
    that another user could write into, or make first, or swap (a folder or link on the way): the trials load and
    run the code compiled into a kernel cache, and Tune keeps an experiment's lock files in RAY_TMPDIR, where a
    lock of theirs would hold a sweep or a resume for ever."""
    for name, ours in ((RAY_TMPDIR, _ray_tmpdir), (KERNEL_CACHE, _kernel_cache)):
        value = os.environ.get(name)
        if value and value != ours and not os.path.isabs(value):
            return f"{name}={value!r} is a relative path; allowed: an absolute path, or {name} unset"
    for name, ours, what in (
        (KERNEL_CACHE, _kernel_cache, "code the trials would load and run"),
        (RAY_TMPDIR, _ray_tmpdir, "the lock files Tune keeps there, holding the sweep or a resume for ever"),
    ):
        value = os.environ.get(name)
        if value and value != ours and (problem := others_could_steer(value)):
            allowed = f"allowed: a folder only you can write, or {name} unset (a private one is used)"
            return f"{name}={value}{problem}, so they could put in {what}; {allowed}"
    return None


def others_could_steer(value: str) -> str | None:
    """How another user could write the folder `value` names, make it first, or swap it (a folder or a link on the
    way), as the end of a sentence after the name; None where none could."""
    real = Path(os.path.realpath(value))  # where it is made: through a link too, one that leads nowhere yet
    folder = real
    while not os.path.lexists(folder) and folder != folder.parent:  # not made yet: by whoever comes first
        folder = folder.parent
    with contextlib.suppress(OSError):
        if others_can_write(os.stat(folder)):
            made = "can be written" if folder == real else f"does not exist, and {folder} can be made in"
            return f" {made} by other users"
    if shared := open_to_all(Path(value)):
        return f": {shared[0]}"
    if others := others_on_the_way(Path(value)):
        return f": {others[0]} is on the way, which {others[1]}"
    return None


def private_kernel_cache() -> None:
    """In a trial's process, torch's kernel cache in this user's private folder unless the user named one: on a
    cluster joined with --address the driver's environment does not reach the trials, and torch's default
    (TMPDIR/torchinductor_USER) may be a folder another user made first, whose kernels a compiled step loads."""
    if not os.environ.get(KERNEL_CACHE):  # (empty: torch's default, as unset)
        os.environ[KERNEL_CACHE] = os.path.join(private_temp_dir(), "torchinductor")


KERNEL_CACHE = "TORCHINDUCTOR_CACHE_DIR"
_kernel_cache: str | None = None  # the value this process gave it, replaced with the next private folder
RAY_TMPDIR = "RAY_TMPDIR"
_ray_tmpdir: str | None = None  # likewise


@contextlib.contextmanager
def own_session():
    """While a local Ray starts: its processes (GCS, raylet, and through the raylet every worker) start in a session
    of their own. A stop signal sent to the driver's whole process group (`timeout`, systemd's
    KillMode=control-group, `kill -- -PGID`) then reaches the driver alone, which asks the trials to save and stops
    Ray itself; in the driver's group, the GCS died of it and the stop could save nothing. Ray still ends with the
    driver however it ends: each of its processes is told the driver's death by the kernel (Ray's fate sharing)."""
    from ray._private import services

    started = getattr(services, "ConsolePopen", None)
    if started is None:  # a Ray that starts its processes some other way: they stay in the driver's group
        yield
        return

    class InOwnSession(started):
        def __init__(self, *args, **kwargs):
            kwargs["start_new_session"] = True
            super().__init__(*args, **kwargs)

    services.ConsolePopen = InOwnSession
    try:
        yield
    finally:
        services.ConsolePopen = started


@contextlib.contextmanager
def from_the_root_folder():
    """The working folder '/' meanwhile, which only root can write: ray.init puts the working folder first on every
    worker's import path, and matplotlib reads ./matplotlibrc at its import, so a torch.py (run in every trial) or
    a FIFO (a hang) that another user left in a shared folder the command runs in took effect. The working folder
    is back after, held open by descriptor (it may be gone, or have been renamed, meanwhile)."""
    try:
        here = os.open(".", os.O_PATH | os.O_DIRECTORY)
    except OSError:  # a working folder that cannot be held: none to go back to, so stay
        here = None
    try:
        if here is not None:
            os.chdir("/")
        yield
    finally:
        if here is not None:
            with contextlib.suppress(OSError):
                os.fchdir(here)
            os.close(here)


def _working_folder_as_temp(given: str) -> bool:
    """Whether tempfile, finding no temporary folder it can write (a read-only /tmp), took the working folder."""
    named = [os.environ.get(v) for v in ("TMPDIR", "TEMP", "TMP")]
    candidates = {"/tmp", "/var/tmp", "/usr/tmp", *(os.path.abspath(v) for v in named if v)}  # tempfile's, in turn
    try:
        return given == os.getcwd() and given not in candidates
    except OSError:  # (no working folder: tempfile did not take it)
        return False


def private_temp_dir() -> str:
    """/tmp/tune-alexnet-UID, mode 0700, owned by this user; refused (UnsafeTempDir) if another user or a link
    holds that name."""
    given, own = tempfile.gettempdir(), f"tune-alexnet-{os.getuid()}"
    if _working_folder_as_temp(given):
        raise UnsafeTempDir(
            f"has no temporary folder to lie in (/tmp and /var/tmp cannot be written, and the working folder {given} "
            "is no place for it); set TMPDIR to a folder of yours"
        )
    base = os.path.realpath(given)  # where a link on the way leads now: re-pointed mid-sweep, it moves nothing of Ray's
    if spelled := not_utf8(base):  # Ray names its sessions' files in UTF-8: it fails halfway, its session half-made
        raise UnsafeTempDir(
            f"cannot lie in {spelled}, whose name is not UTF-8{locale_note()}; set TMPDIR to another folder"
        )
    if len(os.fsencode(base)) + 1 + len(own) + RAY_SOCKET_TAIL + _pid_digits() > SOCKET_PATH_MAX:
        given, base = "/tmp", os.path.realpath("/tmp")
    path = os.path.join(base, own)
    why = None  # a warning, not a refusal: a container's /tmp (Kubernetes' emptyDir) is often so, for one user
    if owner := owned_by_another(Path(given)):  # (through the links as given: their owners can re-point them)
        step, why = owner[0], f"which another user owns (uid {owner[1]}; the sticky bit does not bind an owner)"
    elif unstuck := open_without_sticky(Path(given)):
        step, why = unstuck[0], f"which other users can write to (mode {unstuck[1]:04o}, no sticky bit)"
    if why:
        say(
            f"tune-alexnet: warning: the local Ray's folder {path} lies in {step}, {why}, so they could put a folder "
            f"of theirs in its place; set TMPDIR to a folder only you can write to where other users share this "
            "machine"
        )
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafeTempDir(f"{path} is not a folder of this user's; remove it, or set TMPDIR to another folder")
    # Checked before it is made private: a folder found open stays refused until its planted entries are gone.
    _check_private_entries(path, was_open=bool(st.st_mode & 0o022))
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _pid_digits() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return len(str(int(f.read()) - 1))
    except (OSError, ValueError):
        return 7  # Linux's largest pid_max, 2**22


def _check_private_entries(path: str, was_open: bool) -> None:
    """Nothing in the private folder that this user did not make: Ray follows links it finds there and writes its
    whole session through them. In a folder found writable by others nothing can be told from a planted entry;
    below, only this user's own folders (and, inside Ray's own, the links Ray makes) are taken."""
    fix = f"remove {path}, or set TMPDIR to another folder"
    entries = sorted(os.listdir(path))
    if was_open and entries:
        raise UnsafeTempDir(
            f"{path} was writable by other users and holds {entries[0]!r}, which may have been planted; {fix}"
        )
    for name in entries:
        _check_entry(os.path.join(path, name), fix, links_allowed=False)
        ray_dir = os.path.join(path, name)
        if name == "ray" and stat.S_ISDIR(os.lstat(ray_dir).st_mode):
            for inner in sorted(os.listdir(ray_dir)):
                _check_entry(os.path.join(ray_dir, inner), fix, links_allowed=True)


def _check_entry(entry: str, fix: str, links_allowed: bool) -> None:
    st = os.lstat(entry)
    if st.st_uid != os.getuid():
        raise UnsafeTempDir(f"{entry} belongs to another user (uid {st.st_uid}); {fix}")
    if stat.S_ISLNK(st.st_mode) and not links_allowed:
        raise UnsafeTempDir(
            f"{entry} is a symbolic link to {os.readlink(entry)}, which tune-alexnet never makes; {fix}"
        )
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UnsafeTempDir(f"{entry} is not a folder or a file; {fix}")


AUTH_MODE = "RAY_AUTH_MODE"  # Ray's switch for token authentication: token (its default) or disabled
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"  # where Ray reads its token from, instead of ~/.ray/auth_token
K8S_AUTH = "RAY_ENABLE_K8S_TOKEN_AUTH"  # Ray's second switch: Kubernetes service-account tokens


def auth_mode_problem() -> str | None:
    """Why the local Ray this package starts would run without token authentication (then any client that
    reaches its GCS, which listens on every interface, could run code as this user), or with Kubernetes' tokens,
    which only a KubeRay cluster has: its GCS then refuses its own raylet, after a stream of Ray's warnings."""
    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode != "token":  # Ray reads any other spelling (" token", "TOKEN ") as none
        return (
            f"{AUTH_MODE}={mode} would start the local Ray without token authentication, so anyone who reaches this "
            f"machine could run code as you through it; unset {AUTH_MODE} (or set it to token)"
        )
    k8s = os.environ.get(K8S_AUTH, "")
    if k8s.strip().lower() in ("1", "true"):
        return (
            f"{K8S_AUTH}={k8s} asks for Kubernetes token authentication, which only a Ray cluster on Kubernetes "
            f"(KubeRay) has, not the local Ray this command starts; unset {K8S_AUTH}, or join that cluster with "
            "--address"
        )
    return None


def token_path() -> Path:
    return Path(os.environ.get(TOKEN_PATH) or home() / ".ray" / "auth_token")


TOKEN = "RAY_AUTH_TOKEN"  # the token itself, instead of a file
BLANK = b" \t\n\r\x0b\x0c"  # what Ray trims from a token: a token of these alone is none to it
TOKEN_BYTES = 4096  # Ray sends the token in a gRPC header, whose metadata is capped at 8 KiB in all


def _token_text_problem(raw: bytes, where: str) -> str | None:
    """Why a token Ray would read cannot go in the gRPC header Ray sends it in (Ray aborts the whole process on
    one, mid-start): too long, or a byte other than printable ASCII once Ray trims blank space."""
    token = raw.strip(BLANK)
    if len(token) > TOKEN_BYTES:
        return f"{where} is {len(token)} bytes long; allowed: at most {TOKEN_BYTES} bytes"
    bad = next((i for i, b in enumerate(token) if not 0x20 <= b <= 0x7E), None)
    if bad is not None:
        return f"{where} holds byte 0x{token[bad]:02x} at {bad}; allowed: printable ASCII characters"
    return None


def token_problem() -> str | None:
    """Why Ray's token cannot serve the local Ray: a blank one (Ray reads it as none, then reads or makes the
    file); a link (Ray would write the token through it, or use one that someone else knows), a folder, a file of
    another user's, one that others could have written or could replace, or that cannot be read; or, where there
    is none yet, a folder where Ray cannot save a new one (a read-only HOME) or others could replace it."""
    given = os.environ.get(TOKEN)
    if given is not None:  # the token itself, given in the environment: no file is used, unless it is blank
        if not given.encode(errors="replace").strip(BLANK):
            return (
                f"{TOKEN} is set but blank, which Ray reads as no token at all (it would then use or make "
                f"{token_path()}); allowed: the token itself, or {TOKEN} unset"
            )
        return _token_text_problem(given.encode("utf-8", "surrogateescape"), f"{TOKEN}, Ray's token,")
    path = token_path()
    allowed = f"allowed: a file of your own, or none (Ray then makes one); or point {TOKEN_PATH} at one"
    if not path.is_absolute():  # a relative HOME: the token would be sought wherever the command is started
        return f"Ray's token {path} is a relative path (HOME or {TOKEN_PATH} is); allowed: an absolute path"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if os.environ.get(TOKEN_PATH):  # named on purpose: Ray would refuse to start without it
            return f"Ray's token {path} ({TOKEN_PATH}) does not exist; {allowed}"
        return _token_folder_problem(path)
    except OSError as exc:
        return f"Ray's token {path} cannot be read ({exc.strerror}); {allowed}"
    if stat.S_ISLNK(st.st_mode):
        return f"Ray's token {path} is a symbolic link, through which Ray would read or write it; {allowed}"
    if stat.S_ISDIR(st.st_mode):
        return f"Ray's token {path} is a folder; {allowed}"
    if not stat.S_ISREG(st.st_mode):
        return f"Ray's token {path} is not a regular file; {allowed}"
    if st.st_uid != os.getuid():
        return f"Ray's token {path} belongs to another user (uid {st.st_uid}), who knows it; {allowed}"
    if others_can_write(st):
        return (
            f"Ray's token {path} can be written by other users (mode {stat.S_IMODE(st.st_mode):04o}), who may have "
            f"put a token of theirs in it; allowed: a token file only you can write (mode 0600), or none (Ray then "
            f"makes one)"
        )
    folder = _folder_problem(path.parent, path)
    if folder:
        return f"{folder}; {allowed}"
    if st.st_size == 0:
        return f"Ray's token {path} is empty; {allowed}"
    if st.st_size > 16 * TOKEN_BYTES:  # not read: more than any trimming could bring within the limit
        return f"Ray's token {path} is {st.st_size} bytes long; allowed: at most {TOKEN_BYTES} bytes"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            head = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"Ray's token {path} cannot be read ({exc.strerror}); {allowed}"
    if not head.strip(BLANK) and len(head) == st.st_size:
        return f"Ray's token {path} holds only blank space, which Ray reads as no token; {allowed}"
    return _token_text_problem(head, f"Ray's token {path}")


def _token_folder_problem(path: Path) -> str | None:
    folder = path.parent
    existing = folder
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if os.path.islink(folder):
        return f"Ray's token folder {folder} is a symbolic link, through which Ray would write its token"
    unsafe = _folder_problem(existing, path)
    if unsafe:
        return f"{unsafe}; allowed: a token folder only you can write to, or point {TOKEN_PATH} at a token file in one"
    if not os.access(existing, os.W_OK):
        why = "is on a read-only file system" if _read_only(existing) else "cannot be written"
        return (
            f"Ray's token {path} does not exist and {existing} {why}, so Ray cannot save one; set HOME to a "
            f"writable folder, or point {TOKEN_PATH} at a token file (ray get-auth-token --generate)"
        )
    return None


def _folder_problem(folder: Path, token: Path) -> str | None:
    """Why another user could put a token of theirs in place of the one at `token` before Ray reads it: its folder
    or one on the way to it is theirs, or it or a folder above it is writable by them without the sticky bit (which lets only an entry's
    owner remove or rename it)."""
    if owner := owned_by_another(folder):  # it, a folder on the way to it, or a link there: they may swap it
        return f"Ray's token {token} lies in {owner[0]}, which belongs to another user (uid {owner[1]})"
    unstuck = open_without_sticky(folder)
    if unstuck:
        return (
            f"Ray's token {token} lies in {unstuck[0]}, which other users can write to (mode {unstuck[1]:04o}, no "
            f"sticky bit), so they could replace it"
        )
    return None


def open_without_sticky(folder: Path, everyone: bool = False) -> tuple[Path, int] | None:
    """The first folder on the way to `folder` (itself included) that other users (`everyone`: all users) can write
    to without the sticky bit (which lets only an entry's owner remove or rename it), with its mode; None where
    there is none."""
    for step in dict.fromkeys(_folders_on_the_way(folder)):
        try:
            st = os.stat(step)
        except OSError:
            continue  # a folder above that cannot be looked at: Ray would fail on it, not be fooled
        if (st.st_mode & stat.S_IWOTH if everyone else others_can_write(st)) and not st.st_mode & stat.S_ISVTX:
            return step, stat.S_IMODE(st.st_mode)
    return None


def open_to_all(folder: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) where a folder on the way to `folder` can be written by every user without the
    sticky bit: anyone could swap what lies below it. Refused wherever the package writes or reads its own files."""
    if unstuck := open_without_sticky(folder, everyone=True):
        step, mode = unstuck
        return (f"{step} can be written by every user and has no sticky bit (mode {mode:04o})",
                f"chmod o-w {step}, or chmod +t {step} as /tmp has")  # fmt: skip
    return None


def others_on_the_way(folder: Path) -> tuple[Path, str] | None:
    """The first folder on the way to `folder` that a group of other users can write, or another user owns, and
    which of the two: they could swap what lies below it. Said, not refused, as a team may share a folder (one open
    to all is refused first, with open_without_sticky(everyone=True))."""
    if shared := open_without_sticky(folder):
        return shared[0], f"a group of other users can write (mode {shared[1]:04o}, no sticky bit)"
    if owner := owned_by_another(folder):
        return owner[0], f"another user owns (uid {owner[1]})"
    return None


def owned_by_another(folder: Path) -> tuple[Path, int] | None:
    """The first folder on the way to `folder` (itself included) that a user other than root and this one owns:
    they may rename or remove what it holds, sticky bit or not."""
    for step in dict.fromkeys([*_folders_on_the_way(folder), Path(as_given(folder))]):
        with contextlib.suppress(OSError):
            if (uid := os.lstat(step).st_uid) not in (0, os.getuid()):  # a link's own owner can re-point it
                return step, uid
    return None


def _folders_on_the_way(path: Path, links: list | None = None) -> list[Path]:
    """Every folder a name is looked up in to reach `path`, each link followed as the kernel follows it (through
    the folders its target names), and each link itself: whoever can write one of them, or owns the link, could swap
    what comes after it. At most 40 links in all, the kernel's own limit (links naming links twice over, counted by
    depth alone, made 2**depth walks)."""
    links = [40] if links is None else links
    folders, here = [], Path("/")
    for part in Path(as_given(path)).parts[1:]:
        if part == "..":  # the kernel's: the folder above where the link led
            here = here.parent
            continue
        folders.append(here)
        step = here / part
        if os.path.islink(step) and links[0] > 0:  # (a name too long is no link)
            links[0] -= 1
            folders.append(step)
            target = Path(os.readlink(step))
            folders += _folders_on_the_way(target if target.is_absolute() else here / target, links)
            here = Path(os.path.realpath(step))
        else:
            here = step
    return [*folders, here]


def others_can_write(st: os.stat_result) -> bool:
    """Writable by any other user: by all, or by a group that is not this user's own private one."""
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid)


def _private_group(gid: int) -> bool:
    """A group of this user alone: Debian, Ubuntu and Fedora give each user one of its own name, with a umask of
    002, so their files are group-writable yet no one else's to write."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
        others = [p.pw_name for p in pwd.getpwall() if p.pw_gid == gid and p.pw_uid != os.getuid()]
    except (KeyError, OSError):
        return False
    return gid == os.getgid() and group.gr_name == user and set(group.gr_mem) <= {user} and not others


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def keep_token_private() -> bool:
    """Ray's token (its servers refuse any client without it) is written readable by all; only this user may
    read it. Whether it had been readable by others."""
    path = token_path()
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
            return bool(st.st_mode & stat.S_IROTH or st.st_mode & stat.S_IRGRP and not _private_group(st.st_gid))
    except OSError:
        pass
    return False


def _new_private_token() -> None:
    """Where Ray would make a new token, make it first, mode 0600: Ray writes it readable by all, for the seconds
    until ray.init returns. Made as Ray makes one: 256 random bits in hex."""
    if os.environ.get(TOKEN) is not None or os.environ.get(TOKEN_PATH):
        return  # Ray makes a token only in its default place
    path = token_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return  # there already, or it cannot be made here: token_problem has had its say, and Ray has the last
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except OSError:
        path.unlink(missing_ok=True)  # an empty token would be refused on the next run


def gcs_of_yours(address: str) -> bool:
    """Whether a Ray node of this user's (or root's) on this machine names `address` as its GCS, as Ray's own lookup
    reads raylets' command lines. `auto` takes an address from a file in Ray's shared temp folder, which any user
    may write, or from any user's Ray: ray.init would send that address this user's token."""
    import psutil
    from ray._private.services import _is_raylet_process, canonicalize_bootstrap_address

    def canonical(given: str) -> str | None:  # as `auto` gives it: loopback and localhost as the node's own IP
        try:
            return canonicalize_bootstrap_address(given)
        except Exception:
            return None

    want = canonical(address) or address
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmdline, uids = proc.info["cmdline"], proc.info["uids"]
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if uids is None or {uids.real, uids.effective} - {0, os.getuid()} or not _is_raylet_process(cmdline):
            continue
        named = [
            arg.split("=", 1)[1] for part in cmdline for arg in part.split(" ") if arg.startswith("--gcs-address=")
        ]
        if any(gcs in (address, want) or canonical(gcs) == want for gcs in named):
            return True
    return False


ADDRESS_ALLOWED = "allowed: the address of a running Ray head (host:port), auto, or none for a local Ray"


def address_problem(address: str) -> str | None:
    """Why `address` names no Ray cluster a sweep can join: blank (which would quietly start a local Ray), or a
    Ray Client address. A sweep's driver runs on a node of the cluster: it reads and writes its experiment folder,
    and its stop signals reach its trials, neither of which a Ray Client driver (whose Tune runs on the head) does."""
    if not address.strip():
        return f"invalid value {address!r}: an empty address; {ADDRESS_ALLOWED}"
    if not address.isprintable():
        return f"invalid value {address!r}: a control character in it; {ADDRESS_ALLOWED}"
    if address.strip().lower().startswith("ray://"):
        return (
            f"invalid value {address!r}: Ray Client (ray://) addresses are not supported, as the sweep must run on a "
            f"node of the cluster (or be submitted as a Ray job); {ADDRESS_ALLOWED}"
        )
    if address.strip().lower().startswith(("http://", "https://")):
        return (
            f"invalid value {address!r}: that is a Ray dashboard's address, which 'ray job submit' takes; a sweep "
            f"joins the cluster itself (host:6379 by default); {ADDRESS_ALLOWED}"
        )
    if address in ("auto", "local") or "://" in address:
        return None
    host, colon, port = address.rpartition(":")
    if not (colon and host.strip() and port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        # Ray retries an address it cannot parse for minutes; a port past C's long is a traceback
        return f"invalid value {address!r}: not host:port with a port from 1 to 65535; {ADDRESS_ALLOWED}"
    return None


def checked_address(text: str) -> str:
    """--address as typed, or one line on why it cannot be joined."""
    import argparse

    problem = address_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def startable_node_types() -> list[dict]:
    """Resources of each node type the connected cluster's autoscaler can start ([] without an autoscaler):
    an autoscaling cluster's GPU workers are not up when a sweep starts, yet its trials must ask for GPU
    shares so that the autoscaler starts them."""
    import ray

    context = ray.get_runtime_context()
    head = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    try:
        if not head or head[0]["NodeID"] == context.get_node_id():
            return autoscaler_node_types(context.gcs_address)
        # the autoscaler's config lies on the head node: read it there
        task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)
        return ray.get(task(autoscaler_node_types).remote(context.gcs_address), timeout=60)
    except Exception as exc:  # no verdict is no reason to refuse: go by the nodes that are up
        log.warning("could not read the autoscaler's node types (%s); going by the nodes that are up", exc)
        return []


def max_cluster_gpus(node_types: list[dict]) -> float:
    """GPUs the connected cluster has now, or that one node of a startable type has."""
    import ray

    return max([float(ray.cluster_resources().get("GPU", 0))] + [float(t.get("GPU", 0)) for t in node_types])


def autoscaler_node_types(gcs_address: str) -> list[dict]:
    """Resources of the node types that this machine's autoscaler (for the cluster at `gcs_address`) can start.

    Ray keeps the node types only in the autoscaler's own config file, named on its monitor's command line
    (`ray up` puts it in ~/ray_bootstrap_config.yaml); a monitor without one, as an embedded Ray has, means
    no autoscaling. Only this user's monitor is read: another's could name any address and a config of theirs
    (node types with GPUs this cluster can never start, and trials pending for ever); one seen is said.
    """
    import yaml

    config, monitor_seen, theirs = None, False, None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args):
                continue
            if f"--gcs-address={gcs_address}" not in args:
                continue
            if (owner := os.stat(f"/proc/{pid}").st_uid) != os.getuid():
                theirs = owner
                continue
        except OSError:
            continue
        monitor_seen = True
        for a in args:
            if a.startswith("--autoscaling-config="):
                config = Path(os.readlink(f"/proc/{pid}/cwd"), os.path.expanduser(a.split("=", 1)[1]))
    if config is None:
        if monitor_seen:
            return []
        if theirs is not None:  # (said, and passed over: whoever can start a process would steer this one)
            log.warning("a process of another user (uid %d) names itself the autoscaler of the cluster at %s; its "
                        "node types are not read", theirs, gcs_address)  # fmt: skip
        config = Path(BOOTSTRAP_CONFIG).expanduser()
    if not config.is_file():
        return []
    cfg = yaml.safe_load(config.read_text()) or {}
    return [
        dict(t.get("resources") or {})
        for name, t in (cfg.get("available_node_types") or {}).items()
        if name == cfg.get("head_node_type") or int(t.get("max_workers", cfg.get("max_workers", 0)) or 0) > 0
    ]


def on_network_filesystem(path: str) -> bool:
    """Whether `path` lies on a filesystem that other machines can mount too (from /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    best, fstype = "", ""
    for mount_point, kind in mounts:
        if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype in NETWORK_FILESYSTEMS


def local_storage_problem(nodes: list[dict], per_trial: dict, joined: bool) -> str | None:
    """Why trials could not all write to a local folder: several nodes now, or (on a cluster we joined, which
    may autoscale) no node up yet that can hold one trial, so trials will run on machines started later."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"this Ray cluster has {len(alive)} nodes, whose trials cannot write there"
    fits = any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in per_trial.items() if v > 0) for n in alive)
    if joined and not fits:
        wants = ", ".join(f"{v:g} {k}" for k, v in per_trial.items() if v > 0)
        return (
            f"no node of this cluster has the {wants} a trial asks for yet, so trials will run on nodes "
            f"started later, which cannot write there"
        )
    return None
