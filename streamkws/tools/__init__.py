"""Command-line tools for measuring and tuning streamkws (``python -m streamkws.tools.<name>``)."""
