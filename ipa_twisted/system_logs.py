"""Collect the ramdisk's logs and diagnostics as a base64 text of a gzipped tar.

The journal (or, without journald, the text files under /var/log) and the output of a few
diagnostic commands go into one in-memory archive, as the reference agent's
``collect_system_logs`` does. Programs run on the reactor through the ProcessRunner, all at
once; files are read and the archive is built in the reactor's thread pool. The uncompressed
content is capped at ``max_bytes``: the biggest members are cut first (logs keep their tail,
command outputs their head) and each cut is said in the member itself and in ``manifest``.
A missing tool or file is a line in ``collection-errors``, never an exception.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ipa_twisted.errors import CommandExecutionError
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, ProcessRunner

log = Logger()

COMMAND_TIMEOUT = 30.0
JOURNAL_TIMEOUT = 120.0
DEFAULT_MAX_BYTES = 10 * 1024 * 1024

# (member name, argv, keep the tail when cut). Every one runs; a missing one is noted.
COMMANDS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("dmesg", ("dmesg",), True),
    ("ps", ("ps", "aux"), False),
    ("df", ("df", "-a"), False),
    ("mount", ("mount",), False),
    ("ip_addr", ("ip", "addr"), False),
    ("ip_route", ("ip", "route"), False),
    ("ip_route_v6", ("ip", "-6", "route"), False),
    ("lsblk", ("lsblk", "-a"), False),
    ("lsblk-full", ("lsblk", "--all", "--bytes", "--output-all", "--pairs"), False),
    ("parted", ("parted", "-l"), False),
    ("multipath", ("multipath", "-ll"), False),
    ("lshw", ("lshw", "-quiet", "-json"), False),
    ("udevadm", ("udevadm", "info", "--export-db"), False),
)

MANIFEST = "manifest"
ERRORS = "collection-errors"
JOURNAL = "journal"
VAR_LOG_PREFIX = "var_log"

_SNIFF = 8192
_NOTE_ROOM = 128
_COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".zip", ".journal", ".journal~")


@dataclass
class _Item:
    """One archive member before the size cap: ``data`` may already be a tail of the source."""

    name: str
    data: bytes
    source: str
    keep_tail: bool
    original_size: int


@dataclass
class _Files:
    items: list[_Item]
    errors: list[str]
    skipped: list[str]


def gzip_and_base64encode(io_dict: Mapping[str, bytes], file_list: Sequence[str] = ()) -> str:
    """A gzipped tar of ``io_dict`` (member name -> content) and ``file_list``, in base64.

    Files are stored under their path without the leading ``/``. Pure and blocking: call it
    in a thread.
    """
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in io_dict.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), now, 0o644
            tar.addfile(info, io.BytesIO(content))
        for path in file_list:
            tar.add(path, arcname=path.lstrip("/"))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def collect_system_logs(runner: ProcessRunner, reactor: IReactorThreads, *,
                              journald_max_lines: int | None = None,
                              max_bytes: int = DEFAULT_MAX_BYTES,
                              var_log: str = "/var/log", proc_path: str = "/proc",
                              extra_files: Sequence[str] = ()) -> str:
    """The logs and diagnostics of this machine: base64 of a tar.gz, at most ``max_bytes``
    of uncompressed content (plus the manifest).

    Raises CommandExecutionError only if the archive cannot be built.
    """
    max_bytes = max(0, max_bytes)
    # (member, path, keep the tail when cut); mdstat reads as a command output.
    files = [("mdstat", os.path.join(proc_path, "mdstat"), False),
             *((_member_name(path), path, True) for path in extra_files)]
    # Start everything before awaiting anything.
    reading = deferToThreadPool(reactor, reactor.getThreadPool(), _read_files, files,
                                max_bytes)
    journal = Deferred.fromCoroutine(
        _journal(runner, reactor, journald_max_lines, max_bytes, var_log))
    commands = [Deferred.fromCoroutine(_run(runner, name, argv, keep_tail))
                for name, argv, keep_tail in COMMANDS]

    items: list[_Item] = []
    errors: list[str] = []
    skipped: list[str] = []
    try:
        read = await reading
    except Exception as e:  # the thread function catches per file; this is unexpected
        errors.append(f"files: could not read {', '.join(p for _, p, _ in files)}: {e}")
    else:
        items += read.items
        errors += read.errors
        skipped += read.skipped
    logs = await journal
    items[:0] = logs.items
    errors[:0] = logs.errors
    skipped += logs.skipped
    for done in commands:
        item, error = await done
        if item is not None:
            items.append(item)
        if error is not None:
            errors.append(error)

    try:
        encoded, stored = await deferToThreadPool(
            reactor, reactor.getThreadPool(), _build, items, errors, skipped, max_bytes)
    except Exception as e:
        log.failure("Could not build the system logs archive")
        raise CommandExecutionError(f"Failed to build the system logs archive: {e}") from e
    log.info("Collected system logs: {count} members, {stored} bytes uncompressed, "
             "{size} bytes in base64", count=len(items) + 1 + bool(errors), stored=stored,
             size=len(encoded))
    return encoded


async def _run(runner: ProcessRunner, name: str, argv: tuple[str, ...],
               keep_tail: bool) -> tuple[_Item | None, str | None]:
    """One command's output as a member, and/or a note on why it is missing or partial."""
    source = " ".join(argv)
    try:
        out, _ = await runner.execute(*argv, timeout=COMMAND_TIMEOUT)
    except CommandNotFoundError:
        return None, f"{name}: {argv[0]} is not installed"
    except ProcessExecutionError as e:
        detail = e.stderr.decode("utf-8", "replace").strip().splitlines()
        note = f"{name}: {source!r} failed ({e.reason})"
        if detail:
            note += f": {detail[-1][:200]}"
        partial = _Item(name, e.stdout, source, keep_tail, len(e.stdout)) if e.stdout else None
        return partial, note
    except Exception as e:
        log.warn("Collecting {name} failed: {error!r}", name=name, error=e)
        return None, f"{name}: {source!r} failed: {e!r}"
    return _Item(name, out, source, keep_tail, len(out)), None


async def _journal(runner: ProcessRunner, reactor: IReactorThreads, lines: int | None,
                   max_bytes: int, var_log: str) -> _Files:
    """The journal, or the files under ``var_log`` when journalctl is missing or fails."""
    argv = ["journalctl", "--full", "--no-pager", "-b"]
    if lines is not None:
        argv += ["-n", str(lines)]
    errors = []
    try:
        out, _ = await runner.execute(*argv, timeout=JOURNAL_TIMEOUT)
    except CommandNotFoundError:
        pass  # no systemd: plain log files, as the reference agent does
    except Exception as e:
        errors.append(f"{JOURNAL}: {' '.join(argv)!r} failed ({e}); read {var_log} instead")
    else:
        return _Files([_Item(JOURNAL, out, " ".join(argv), True, len(out))], [], [])
    try:
        found = await deferToThreadPool(reactor, reactor.getThreadPool(), _read_var_log,
                                        var_log, max_bytes)
    except Exception as e:
        errors.append(f"{VAR_LOG_PREFIX}: could not read {var_log}: {e}")
        return _Files([], errors, [])
    found.errors[:0] = errors
    return found


# In a thread from here on.

def _member_name(path: str) -> str:
    return path.lstrip(os.sep) or path


def _is_binary(path: str) -> bool:
    if path.endswith(_COMPRESSED):
        return True
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF)


def _read_tail(path: str, size: int, limit: int) -> bytes:
    """At most the last ``limit`` bytes of ``path`` (whose size was ``size``)."""
    with open(path, "rb") as f:
        if size > limit:
            f.seek(size - limit)
        return f.read(limit)


def _read_files(files: Sequence[tuple[str, str, bool]], max_bytes: int) -> _Files:
    """Single files (mdstat, extra files), each at most its tail of ``max_bytes``."""
    result = _Files([], [], [])
    for name, path, keep_tail in files:
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                result.errors.append(f"{name}: {path} is not a regular file")
                continue
            # /proc files claim size 0: read them up to the cap.
            data = _read_tail(path, info.st_size, max_bytes) if info.st_size else \
                _read_small(path, max_bytes)
        except FileNotFoundError:
            result.errors.append(f"{name}: {path} does not exist")
            continue
        except OSError as e:
            result.errors.append(f"{name}: cannot read {path}: {e.strerror or e}")
            continue
        result.items.append(_Item(name, data, path, keep_tail, max(info.st_size, len(data))))
    return result


def _read_small(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _read_var_log(var_log: str, max_bytes: int) -> _Files:
    """Regular text files under ``var_log``; the reading budget is shared fairly, so the
    biggest files are read only as their tail and memory stays near ``max_bytes``."""
    result = _Files([], [], [])
    sizes: dict[str, int] = {}
    if not os.path.isdir(var_log):
        result.errors.append(f"{VAR_LOG_PREFIX}: {var_log} is not a directory")
        return result

    def walk_error(e: OSError) -> None:
        result.errors.append(f"{VAR_LOG_PREFIX}: cannot list {e.filename}: {e.strerror or e}")

    for top, dirs, names in os.walk(var_log, onerror=walk_error):
        dirs.sort()
        for file_name in sorted(names):
            path = os.path.join(top, file_name)
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if _is_binary(path):
                    result.skipped.append(f"{path} (binary)")
                    continue
            except OSError as e:
                result.errors.append(f"{VAR_LOG_PREFIX}: cannot read {path}: "
                                     f"{e.strerror or e}")
                continue
            sizes[path] = info.st_size
    shares = _fair_shares(sizes, max_bytes)
    for path, size in sizes.items():
        name = f"{VAR_LOG_PREFIX}/{os.path.relpath(path, var_log)}"
        try:
            data = _read_tail(path, size, shares[path]) if shares[path] else b""
        except OSError as e:
            result.errors.append(f"{VAR_LOG_PREFIX}: cannot read {path}: {e.strerror or e}")
            continue
        result.items.append(_Item(name, data, path, True, max(size, len(data))))
    return result


def _fair_shares(sizes: Mapping[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` so small entries are whole and the biggest share what is left."""
    shares: dict[str, int] = {}
    left, count = max(0, budget), len(sizes)
    for key, size in sorted(sizes.items(), key=lambda kv: kv[1]):
        shares[key] = min(size, left // count)
        left -= shares[key]
        count -= 1
    return shares


def _cut(item: _Item, share: int) -> tuple[bytes, str]:
    """``item`` in at most ``share`` bytes, a cut said inside, and its manifest status."""
    data = item.data
    if len(data) <= share and len(data) == item.original_size:
        return data, "complete"

    def note(dropped: int) -> bytes:
        where = "first" if item.keep_tail else "last"
        return (f"\n[ipa-twisted: truncated: the {where} {dropped} of "
                f"{item.original_size} bytes are not included]\n").encode()

    kept = min(len(data), max(0, share - len(note(item.original_size))))
    if kept == 0:
        return b"", f"dropped ({item.original_size} bytes; no room left)"
    said = note(item.original_size - kept)
    if item.keep_tail:
        content = said.lstrip(b"\n") + data[-kept:]
        status = f"truncated: last {kept} of {item.original_size} bytes"
    else:
        content = data[:kept] + said
        status = f"truncated: first {kept} of {item.original_size} bytes"
    return content, status


def _manifest(rows: Sequence[tuple[str, int, str, str]], skipped: Sequence[str],
              errors: int, max_bytes: int) -> bytes:
    lines = ["ipa-twisted system logs",
             f"collected: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
             f"size cap: {max_bytes} bytes of uncompressed content", "",
             "member\tbytes\tsource\tstatus"]
    lines += [f"{name}\t{size}\t{source}\t{status}" for name, size, source, status in rows]
    if skipped:
        lines += ["", "not collected:"] + [f"  {entry}" for entry in skipped]
    if errors:
        lines += ["", f"{errors} problem(s) noted in {ERRORS}"]
    return ("\n".join(lines) + "\n").encode()


def _build(items: Sequence[_Item], errors: Sequence[str], skipped: Sequence[str],
           max_bytes: int) -> tuple[str, int]:
    """The capped members and the manifest, archived: (base64 text, uncompressed bytes)."""
    members = list(items)
    if errors:
        text = ("\n".join(errors) + "\n").encode()
        members.insert(0, _Item(ERRORS, text, "this collection", False, len(text)))
    names: dict[str, int] = {}
    for item in members:  # two sources must not overwrite each other's member
        seen = names.get(item.name, 0)
        names[item.name] = seen + 1
        if seen:
            item.name = f"{item.name}.{seen}"
    # What each member would take whole: its data, plus room for the note if already cut.
    sizes = {str(i): len(item.data) + (0 if len(item.data) == item.original_size else _NOTE_ROOM)
             for i, item in enumerate(members)}
    budget = max_bytes
    for _ in range(8):  # the manifest's own size takes from the budget: settle in few rounds
        shares = _fair_shares(sizes, budget)
        cut = [_cut(item, shares[str(i)]) for i, item in enumerate(members)]
        rows = [(item.name, len(content), item.source, status)
                for item, (content, status) in zip(members, cut)]
        manifest = _manifest(rows, skipped, len(errors), max_bytes)
        total = len(manifest) + sum(len(content) for content, _ in cut)
        if total <= max_bytes or budget == 0:
            break
        budget = max(0, budget - (total - max_bytes))
    io_dict = {MANIFEST: manifest}
    io_dict.update((item.name, content) for item, (content, _) in zip(members, cut))
    return gzip_and_base64encode(io_dict), total
