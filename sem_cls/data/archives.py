"""A class tar of the NFFA-Europe record unpacked so that its class folder appears complete or
not at all, refusing members that would land outside it."""

import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from sem_cls.errors import UserError

PARTIAL_SUFFIX = ".partial"  # unpacking in progress; hidden, so ingest never reads it


def _refuse(archive: Path, member: tarfile.TarInfo, why: str) -> UserError:
    return UserError(
        f"{archive} holds {member.name!r}, {why}. Refused: nothing of this archive was unpacked. "
        f"It is not what a class tar of the record should be; delete it to download it again."
    )


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Only plain files and folders, all inside the folder the archive unpacks into."""
    path = PurePosixPath(member.name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"[A-Za-z]:", member.name):
        raise _refuse(archive, member, "an absolute path")
    if ".." in path.parts:
        raise _refuse(archive, member, "a path that leads out of its folder with '..'")
    if not (member.isfile() or member.isdir()):
        raise _refuse(archive, member, "which is not a plain file or folder (a link or device)")


def extract_class(archive: Path, class_dir: Path) -> int:
    """Unpack a class tar so that `class_dir` appears complete or not at all; the file count.

    The tar holds `<Class>/L<k>_<hex>.jpg`: its single top folder becomes `class_dir` (a tar
    of bare files becomes `class_dir` itself).
    """
    partial = Path(
        tempfile.mkdtemp(prefix=f".{class_dir.name}.", suffix=PARTIAL_SUFFIX, dir=class_dir.parent)
    )
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            for member in tqdm(members, desc=f"unpack {archive.name}", unit="file"):
                tar.extract(member, partial, filter="data")  # refuses what slipped past the check
        top = list(partial.iterdir())
        source = top[0] if len(top) == 1 and top[0].is_dir() else partial
        os.replace(source, class_dir)
    except tarfile.FilterError as err:
        raise UserError(f"{archive}: {err}. Refused; delete it to download it again.") from err
    except (tarfile.TarError, EOFError) as err:
        raise UserError(
            f"{archive} is not a readable tar ({err}). Delete it and run the same command again."
        ) from err
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return sum(1 for path in class_dir.rglob("*") if path.is_file())


def stale_partials(target_dir: Path, class_names: list[str]) -> list[Path]:
    """Unpacking folders a killed run left: only names `extract_class`'s mkdtemp can give,
    so a hidden folder of the user's that merely ends in the suffix is never touched."""
    names = "|".join(re.escape(name) for name in class_names)
    made_here = re.compile(rf"\.(?:{names})\.[a-z0-9_]{{8}}{re.escape(PARTIAL_SUFFIX)}")
    return [
        path
        for path in target_dir.glob(f".*{PARTIAL_SUFFIX}")
        if made_here.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
    ]
