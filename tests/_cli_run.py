"""Running the command line in the test process, for tests/test_cli*.py: its exit code and what it
printed, and a byte-for-byte snapshot of a directory (to show a command left it untouched)."""
from __future__ import annotations

import os

from trainpatterns import cli


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(directory):
    return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(directory) for f in fs}
