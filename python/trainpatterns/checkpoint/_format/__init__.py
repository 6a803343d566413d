"""The on-disk format of a checkpoint: directory layout, JSON state trees, safetensors, checksums.

Why our own code: a checkpoint must load without unpickling anything (so an untrusted one cannot run
code), and the write must go straight from the host snapshot to the file (one pass, checksummed as it
goes), and the read straight from the file into tensors (one copy, as ``torch.load``).

- ``layout``: file names of a checkpoint directory, the sealed manifest, the kinds of entry
- ``tree``: state trees as JSON, tensors replaced by references into safetensors files
- ``safetensors``: the safetensors writer and reader
- ``files``: create-only writes, fsync now or deferred, regular files only and strict JSON on read
- ``checksum``: CRC-32 on a helper thread, and the CRC of two byte ranges joined
- ``threads``: the helper threads, and copies and reads split over a few of them
- ``errors``: :class:`CheckpointError`, and ``brief`` to show a value from a checkpoint in one

The writer and reader of ``trainpatterns.checkpoint`` import what they use from here.
"""
from .checksum import Crc32, crc32
from .errors import CheckpointError, brief
from .files import DeferredSync, fsync_dir, open_regular, read_json_file, write_json_file
from .layout import (CORRUPT_SUFFIX, FORMAT, STEP_DIR, TMP_PREFIX, VERSION, check_file_name, entry_file, entry_kind,
                     manifest_crc, rank_base, seal, step_dir)
from .safetensors import read_safetensors, write_safetensors
from .threads import copy_tensors, plain_bytes
from .tree import DTYPES, TensorSink, decode_tree, encode_tree, storage_key

__all__ = ["CheckpointError", "brief", "crc32", "Crc32", "DeferredSync", "fsync_dir", "open_regular", "read_json_file",
           "write_json_file", "read_safetensors", "write_safetensors", "TensorSink", "encode_tree", "decode_tree",
           "storage_key", "DTYPES", "FORMAT", "VERSION", "STEP_DIR", "TMP_PREFIX", "CORRUPT_SUFFIX", "step_dir", "rank_base",
           "entry_file", "check_file_name", "manifest_crc", "seal", "entry_kind", "copy_tensors", "plain_bytes"]
