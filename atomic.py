"""
Atomic file writes, shared by the scripts that write files a reader may open at any moment (shards and
meta.json, checkpoints, exports, plots), and free of torch so that prepare.py's worker processes stay light.

    with atomic_write("data/x/meta.json") as f:
        f.write(text)

The file is written to `path + ".tmp"` in the same directory, flushed to disk and renamed over `path`
(os.replace) only when the block ends without an exception: a reader sees the old file or the whole new
one, never a part. When the block raises (Ctrl-C, a full disk, a refused export), the temporary file is
removed and `path` keeps its old bytes. A killed process (SIGKILL, a power cut) can leave `path + ".tmp"`
behind, never a partial `path`; the next write replaces it. The fixed name, not a random one, lets
prepare.py find and clear such leftovers, and gives the file the permissions a plain open() would.

A library that opens files by name (safetensors' save_file, gguf's GGUFWriter, ...) writes to `f.name`, the
temporary path, and must close what it opened before the block ends; the fsync of `f` then covers its
bytes too, since fsync flushes the file, not one descriptor.
"""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """A file open on `path + ".tmp"` in `mode` ("w" or "wb"), renamed over `path` when the block succeeds."""
    tmp = os.fspath(path) + ".tmp"
    f = open(tmp, mode)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the block's own exception is the one to report
            os.remove(tmp)
        raise
