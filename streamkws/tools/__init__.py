"""Command-line tools for measuring and tuning streamkws (``python -m streamkws.tools.<name>``)."""

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (tools run on headless boards), or
    a clear error naming the optional extra that installs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from streamkws.errors import StreamKWSError

        raise StreamKWSError("--plot needs matplotlib (pip install 'streamkws[train]')") from None
    return plt
