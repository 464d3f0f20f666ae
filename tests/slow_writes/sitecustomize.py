"""Python imports this module at the start of every process with this folder on its ``PYTHONPATH``: run files
are then written through ``faults.SlowFile``, so that the worker processes of ``xclip attribute --devices``, which
a test starts only through the command line, run slowly enough to be signalled mid-run."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for faults.py

import h5py  # noqa: E402
from faults import SlowFile, writers_through  # noqa: E402

h5py.File = writers_through(SlowFile)
