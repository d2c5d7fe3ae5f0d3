"""Checks on a tool's output path, made before the work that fills it.

A bad ``--out`` found only when a 40-minute training run saves is that run lost; one that
names an input would replace the input with the result. Both are found at start-up here.
"""

from __future__ import annotations

import os
from pathlib import Path

from streamkws.errors import StreamKWSError

PICTURES = (".png", ".pdf", ".svg")
"""What ``--plot`` writes: formats matplotlib's default backend always has."""


def check_output(path: str | os.PathLike[str], option: str = "--out",
                 inputs: tuple[str | os.PathLike[str] | None, ...] = (),
                 suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a :class:`Path`, once it is sure to be writable as a new file.

    Refuses a folder, a path equal to one of ``inputs`` (followed through links), a
    suffix not in ``suffixes`` (when given), and a folder that cannot be created or
    written to.
    """
    out = Path(path).expanduser()
    if suffixes and out.suffix.lower() not in suffixes:
        raise StreamKWSError(f"{option} {out}: expected a {' / '.join(suffixes)} file name")
    if out.is_dir():
        raise StreamKWSError(f"{option} {out}: is a folder; give a file name")
    for given in inputs:
        if given is not None and out.exists() and Path(given).exists() \
                and os.path.samefile(out, given):
            raise StreamKWSError(f"{option} {out}: would overwrite an input ({given})")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StreamKWSError(f"{option} {out}: cannot create {parent} "
                             f"({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StreamKWSError(f"{option} {out}: cannot write into {parent}")
    return out
