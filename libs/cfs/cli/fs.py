"""`cfs mount`, `cfs umount`, and `cfs fs ls|stat|cat|get|put|mkdir|rm` for scripts.

`cfs fs` talks to the metadata shards and chunk-stores directly (no mount): paths
are resolved by lookups from the root, symbolic links are followed except in the
last component of `ls`, `stat` and `rm`. It acts with the caller's uid and gid
for new files but checks no permissions: it is an administrator's tool, like
direct access to a storage backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from cfs.bus import Bus
from cfs.cli.errors import ExitCode, one_line, one_line_errors
from cfs.client.metadata import LeaderUnavailable, MetadataClient
from cfs.fuse.config import ClientSettings, client_settings, is_fuse_mount
from cfs.security import Role
from cfs_contracts.fs.records import ROOT_INO, Inode, Kind
from cfs_contracts.fs.rpc import FsError

if TYPE_CHECKING:
    from cfs.client.files import FileStore

app = typer.Typer(help="Files in ClaudeFS without a mount (for scripts).", no_args_is_help=True)

MAX_SYMLINKS = 40  # as Linux: more in one resolution is ELOOP
MOUNT_TIMEOUT_S = 30.0

ClusterOpt = Annotated[
    str | None,
    typer.Option("--cluster", help="NATS URLs, comma-separated (or CFS_NATS_URLS)"),
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="site name (or CFS_SITE)")]
ShardsOpt = Annotated[
    int | None, typer.Option("--shards", min=1, max=999, help="metadata shards (or CFS_SHARDS)")
]


def _fail(message: str, code: ExitCode = ExitCode.FAILED) -> NoReturn:
    typer.echo(f"cfs: {one_line(message)}", err=True)
    raise typer.Exit(int(code))


# -- mount / umount ---------------------------------------------------------------------------
@one_line_errors
def mount(
    mountpoint: Annotated[Path, typer.Argument(help="an existing, empty directory")],
    cluster: ClusterOpt = None,
    site: SiteOpt = None,
    shards: ShardsOpt = None,
    foreground: Annotated[
        bool,
        typer.Option("--foreground/--background", help="stay attached, or return once mounted"),
    ] = False,
    log_file: Annotated[
        Path | None, typer.Option("--log", help="mount process log (background)")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow/--no-follow",
            help="two sites: follow the active one, or keep to this site whatever is active",
        ),
    ] = True,
) -> None:
    """Mount ClaudeFS at MOUNTPOINT (FUSE)."""
    path = Path(os.path.abspath(mountpoint))
    if is_fuse_mount(path):
        _fail(f"{path}: already mounted")
    if not path.is_dir():
        _fail(f"{path}: {os.strerror(errno.ENOENT if not path.exists() else errno.ENOTDIR)}")
    settings = client_settings(cluster, site, shards)
    extra = [] if follow else ["--no-follow"]
    if foreground:
        _mount_foreground(path, settings, extra)
    else:
        _mount_background(path, settings, log_file or _default_log(path), extra)


def _mount_foreground(path: Path, settings: ClientSettings, extra: list[str]) -> None:
    from cfs.fuse.mount import main as mount_main

    mount_main(
        [
            str(path),
            "--cluster",
            ",".join(settings.nats_urls),
            "--site",
            settings.site,
            "--shards",
            str(settings.shards),
            *_credentials_args(settings),
            *extra,
        ]
    )


def _credentials_args(settings: ClientSettings) -> list[str]:
    credentials = settings.credentials_for(Role.CLIENT)
    return ["--credentials", str(credentials)] if credentials is not None else []


def _mount_background(
    path: Path, settings: ClientSettings, log_path: Path, extra: list[str]
) -> None:
    argv = [
        sys.executable,
        "-m",
        "cfs.fuse",
        str(path),
        "--cluster",
        ",".join(settings.nats_urls),
        "--site",
        settings.site,
        "--shards",
        str(settings.shards),
    ]
    argv += [*_credentials_args(settings), *extra]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # A session of its own: the mount outlives this command and its terminal.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not is_fuse_mount(path):
        if proc.poll() is not None:
            _fail(f"{path}: mount failed (exit {proc.returncode}): {_last_line(log_path)}")
        if time.monotonic() > deadline:
            proc.terminate()
            _fail(f"{path}: not mounted after {MOUNT_TIMEOUT_S:.0f}s; see {log_path}")
        time.sleep(0.05)
    typer.echo(f"mounted ClaudeFS site {settings.site} at {path} (pid {proc.pid}, log {log_path})")


def _default_log(path: Path) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = str(path).strip("/").replace("/", "-") or "root"
    return state / "claudefs" / f"mount-{name}.log"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "no output"
    try:  # the mount logs JSON lines; show the event and error of the last one
        entry = json.loads(lines[-1])
        return str(entry.get("error") or entry.get("event"))
    except ValueError:
        return lines[-1]


@one_line_errors
def umount(
    mountpoint: Annotated[Path, typer.Argument(help="where ClaudeFS is mounted")],
    lazy: Annotated[
        bool, typer.Option("--lazy", "-l", help="detach now, clean up when no longer busy")
    ] = False,
) -> None:
    """Unmount ClaudeFS from MOUNTPOINT; the mount process flushes and exits."""
    path = Path(os.path.abspath(mountpoint))
    if not is_fuse_mount(path):
        _fail(f"{path}: not mounted")
    if os.geteuid() == 0:
        argv = ["umount", *(["-l"] if lazy else []), str(path)]
    else:
        argv = ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)]
    if shutil.which(argv[0]) is None:
        _fail(f"{argv[0]} not found; install fuse3")
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"{argv[0]} failed"])[-1]
        _fail(f"{path}: {reason.removeprefix(f'{argv[0]}: ')}")
    typer.echo(f"unmounted {path}")


# -- cfs fs ---------------------------------------------------------------------------------
@dataclass
class Target:
    settings: ClientSettings


@app.callback()
def _fs(ctx: typer.Context, cluster: ClusterOpt = None, site: SiteOpt = None) -> None:
    ctx.obj = Target(client_settings(cluster, site))


class PathError(Exception):
    """An FsError on one path: reported as `cfs: PATH: strerror`."""

    def __init__(self, path: str, error: FsError) -> None:
        super().__init__(f"{path}: {_reason(error)}")
        self.path = path
        self.errno = error.errno


def _reason(error: FsError) -> str:
    """strerror, except for an outage, whose message says what is missing."""
    return error.message if isinstance(error, LeaderUnavailable) else os.strerror(error.errno)


@dataclass
class Session:
    bus: Bus
    meta: MetadataClient

    @contextlib.asynccontextmanager
    async def files(self) -> AsyncIterator[FileStore]:
        """The data path, started only for commands that move file contents."""
        from cfs.client.files import FileStore

        store = FileStore(self.bus, self.meta, client_id=self.bus.node)
        await store.start()
        try:
            yield store
        finally:
            await store.close()

    async def resolve(self, path: str, *, follow: bool = True) -> Inode:
        """The inode at `path` (absolute in ClaudeFS, or relative to its root)."""
        try:
            return await self._walk(path, follow)
        except FsError as exc:
            raise PathError(path, exc) from None

    async def _walk(self, path: str, follow: bool) -> Inode:
        pending = [p for p in path.split("/") if p and p != "."]
        current = await self.meta.getattr(ROOT_INO)
        links = 0
        while pending:
            part = pending.pop(0)
            if not current.is_dir:
                raise FsError(errno.ENOTDIR)
            if part == "..":
                current = await self.meta.getattr(current.parent or ROOT_INO)
                continue
            child = await self.meta.lookup(current.ino, part)
            if child.kind is Kind.SYMLINK and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise FsError(errno.ELOOP)
                target = child.target or ""
                if target.startswith("/"):
                    current = await self.meta.getattr(ROOT_INO)
                pending = [p for p in target.split("/") if p and p != "."] + pending
                continue
            current = child
        return current

    async def parent_and_name(self, path: str) -> tuple[Inode, str]:
        pure = PurePosixPath("/" + path.strip("/"))
        if pure.name in ("", ".", ".."):
            raise PathError(path, FsError(errno.EINVAL))
        parent = await self.resolve(str(pure.parent))
        if not parent.is_dir:
            raise PathError(path, FsError(errno.ENOTDIR))
        return parent, pure.name


def _run(ctx: typer.Context, work: Callable[[Session], Awaitable[bool]]) -> None:
    """Connect, run `work` (False = some path failed, already reported), exit accordingly."""
    target = ctx.find_object(Target)
    settings = target.settings if target is not None else client_settings()

    async def go() -> bool:
        node = f"cli-{os.getpid()}"
        async with await settings.connect(Role.CLIENT, node) as bus:
            return await work(Session(bus, MetadataClient(bus, deadline_s=settings.op_timeout_s)))

    if not asyncio.run(go()):
        raise typer.Exit(int(ExitCode.FAILED))


async def _each(paths: list[str], action: Callable[[str], Awaitable[None]]) -> bool:
    """Like coreutils: report a failing path and go on with the next one."""
    ok = True
    for path in paths:
        try:
            await action(path)
        except PathError as exc:
            typer.echo(f"cfs: {exc}", err=True)
            ok = False
        except FsError as exc:
            typer.echo(f"cfs: {path}: {_reason(exc)}", err=True)
            ok = False
    return ok


def _describe(name: str, inode: Inode) -> dict[str, Any]:
    return {
        "name": name,
        "ino": inode.ino,
        "kind": inode.kind.name.lower(),
        "mode": f"{inode.mode:04o}",
        "uid": inode.uid,
        "gid": inode.gid,
        "nlink": inode.nlink,
        "size": inode.size,
        "atime_ns": inode.atime_ns,
        "mtime_ns": inode.mtime_ns,
        "ctime_ns": inode.ctime_ns,
        **({"target": inode.target} if inode.target is not None else {}),
        **({"chunks": len(inode.chunks)} if inode.kind is Kind.FILE else {}),
    }


def _long_line(name: str, inode: Inode) -> str:
    mtime = datetime.fromtimestamp(inode.mtime_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
    shown = f"{name} -> {inode.target}" if inode.kind is Kind.SYMLINK else name
    return (
        f"{stat.filemode(inode.st_mode)} {inode.nlink:>3} {inode.uid:>5} {inode.gid:>5} "
        f"{inode.size:>12} {mtime} {shown}"
    )


JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@app.command("ls")
@one_line_errors
def ls(
    ctx: typer.Context,
    paths: Annotated[list[str] | None, typer.Argument(help="default: /")] = None,
    long: Annotated[bool, typer.Option("--long", "-l", help="mode, owner, size, time")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List directories (or show files) by path."""
    listing: list[dict[str, Any]] = []

    async def work(session: Session) -> bool:
        async def one(path: str) -> None:
            inode = await session.resolve(path, follow=False)
            if inode.kind is Kind.SYMLINK or not inode.is_dir:
                rows = [(PurePosixPath(path).name or path, inode)]
            else:
                entries = [e async for e in session.meta.readdir(inode.ino)]
                found = await asyncio.gather(*(session.meta.getattr(e.ino) for e in entries))
                rows = sorted(zip((e.name for e in entries), found, strict=True))
            for name, child in rows:
                if as_json:
                    listing.append({"path": path, **_describe(name, child)})
                elif long:
                    typer.echo(_long_line(name, child))
                else:
                    typer.echo(name + ("/" if child.is_dir else ""))

        return await _each(paths or ["/"], one)

    try:
        _run(ctx, work)
    finally:
        if as_json:
            typer.echo(json.dumps(listing, indent=2))


@app.command("stat")
@one_line_errors
def stat_cmd(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="paths in ClaudeFS")],
    as_json: JsonOpt = False,
) -> None:
    """Show inodes: type, mode, owner, size, times, chunk count."""
    shown: list[dict[str, Any]] = []

    async def work(session: Session) -> bool:
        async def one(path: str) -> None:
            info = {"path": path, **_describe(path, await session.resolve(path, follow=False))}
            del info["name"]
            if as_json:
                shown.append(info)
            else:
                typer.echo("\n".join(f"{key:>9}: {value}" for key, value in info.items()))

        return await _each(paths, one)

    try:
        _run(ctx, work)
    finally:
        if as_json:
            typer.echo(json.dumps(shown[0] if len(paths) == 1 and shown else shown, indent=2))


@app.command("cat")
@one_line_errors
def cat(
    ctx: typer.Context, paths: Annotated[list[str], typer.Argument(help="files in ClaudeFS")]
) -> None:
    """Write files' contents to standard output."""

    async def work(session: Session) -> bool:
        async with session.files() as store:

            async def one(path: str) -> None:
                inode = await session.resolve(path)
                try:
                    data = await store.read_all(inode.ino)
                except FsError as exc:
                    raise PathError(path, exc) from None
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()

            return await _each(paths, one)

    _run(ctx, work)


@app.command("get")
@one_line_errors
def get(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="file in ClaudeFS")],
    dest: Annotated[
        Path | None, typer.Argument(help="local file or directory; '-' = stdout")
    ] = None,
) -> None:
    """Copy a file out of ClaudeFS."""
    target = dest or Path(PurePosixPath(source).name)
    if target.is_dir():
        target = target / PurePosixPath(source).name

    async def work(session: Session) -> bool:
        async with session.files() as store:

            async def one(path: str) -> None:
                inode = await session.resolve(path)
                try:
                    data = await store.read_all(inode.ino)
                except FsError as exc:
                    raise PathError(path, exc) from None
                if str(target) == "-":
                    sys.stdout.buffer.write(data)
                else:
                    _write_local(target, data, inode.mode)

            return await _each([source], one)

    _run(ctx, work)


def _write_local(path: Path, data: bytes, mode: int) -> None:
    try:
        path.write_bytes(data)
        path.chmod(mode & 0o777)
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")


@app.command("put")
@one_line_errors
def put(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="local file; '-' = stdin")],
    dest: Annotated[str, typer.Argument(help="file or directory in ClaudeFS")],
) -> None:
    """Copy a local file into ClaudeFS (replacing the contents of an existing file)."""
    try:
        if str(source) == "-":
            data, mode = sys.stdin.buffer.read(), 0o644
        else:
            data, mode = source.read_bytes(), stat.S_IMODE(source.stat().st_mode)
    except OSError as exc:
        _fail(f"{source}: {exc.strerror}")

    async def work(session: Session) -> bool:
        async with session.files() as store:

            async def one(path: str) -> None:
                with contextlib.suppress(PathError):
                    existing = await session.resolve(path)
                    if existing.is_dir:
                        path = f"{path.rstrip('/')}/{source.name}"
                parent, name = await session.parent_and_name(path)
                try:
                    created = await session.meta.create(
                        parent.ino, name, mode, uid=os.getuid(), gid=os.getgid(), exclusive=False
                    )
                    await store.write_all(created.ino, data)
                except FsError as exc:
                    raise PathError(path, exc) from None

            return await _each([dest], one)

    _run(ctx, work)


@app.command("mkdir")
@one_line_errors
def mkdir(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="directories to create")],
    parents: Annotated[
        bool, typer.Option("--parents", "-p", help="create parents; no error if it exists")
    ] = False,
    mode: Annotated[str, typer.Option("--mode", "-m", help="octal permissions")] = "755",
) -> None:
    """Create directories."""
    try:
        perms = int(mode, 8)
    except ValueError:
        _fail(f"invalid mode {mode!r}", ExitCode.USAGE)

    async def work(session: Session) -> bool:
        async def make(path: str) -> None:
            parent, name = await session.parent_and_name(path)
            try:
                await session.meta.mkdir(parent.ino, name, perms, os.getuid(), os.getgid())
            except FsError as exc:
                raise PathError(path, exc) from None

        async def one(path: str) -> None:
            if not parents:
                return await make(path)
            pure = PurePosixPath("/" + path.strip("/"))
            for level in [*reversed(pure.parents[:-1]), pure]:
                try:
                    if not (await session.resolve(str(level))).is_dir:
                        raise PathError(str(level), FsError(errno.ENOTDIR))
                except PathError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    await make(str(level))
            return None

        return await _each(paths, one)

    _run(ctx, work)


@app.command("rm")
@one_line_errors
def rm(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="files (or, with -r, directories)")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="remove directories and their contents")
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="ignore missing paths")] = False,
) -> None:
    """Remove files, or directory trees with -r."""

    async def work(session: Session) -> bool:
        async def remove_tree(directory: Inode) -> None:
            entries = [e async for e in session.meta.readdir(directory.ino)]
            for entry in entries:
                if entry.kind is Kind.DIR:
                    await remove_tree(await session.meta.getattr(entry.ino))
                    await session.meta.rmdir(directory.ino, entry.name)
                else:
                    await session.meta.unlink(directory.ino, entry.name)

        async def one(path: str) -> None:
            try:
                parent, name = await session.parent_and_name(path)
                victim = await session.resolve(path, follow=False)
            except PathError as exc:
                if force and exc.errno == errno.ENOENT:
                    return
                raise
            try:
                if not victim.is_dir:
                    await session.meta.unlink(parent.ino, name)
                elif not recursive:
                    raise FsError(errno.EISDIR)
                else:
                    await remove_tree(victim)
                    await session.meta.rmdir(parent.ino, name)
            except FsError as exc:
                raise PathError(path, exc) from None

        return await _each(paths, one)

    _run(ctx, work)
