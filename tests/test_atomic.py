"""atomic.py: a file appears whole or not at all, and no temporary file is left behind."""

import os

import pytest

from atomic import atomic_write
from conftest import run_python


def test_a_finished_block_replaces_the_file(tmp_path):
    path = str(tmp_path / "meta.json")
    with atomic_write(path) as f:
        f.write("first")
    assert open(path).read() == "first"
    with atomic_write(path, "wb") as f:
        f.write(b"second")
        assert open(path).read() == "first"  # the old file until the block ends
    assert open(path, "rb").read() == b"second"
    assert os.listdir(tmp_path) == ["meta.json"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_block_leaves_the_old_bytes_and_no_temporary_file(tmp_path, error):
    path = str(tmp_path / "shard.bin")
    with open(path, "wb") as f:
        f.write(b"old bytes")
    with pytest.raises(error):
        with atomic_write(path, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            raise error("interrupted")
    assert open(path, "rb").read() == b"old bytes"
    assert os.listdir(tmp_path) == ["shard.bin"]
    with pytest.raises(error):  # and a file that did not exist does not appear
        with atomic_write(str(tmp_path / "new.bin"), "wb") as f:
            f.write(b"half")
            raise error("interrupted")
    assert os.listdir(tmp_path) == ["shard.bin"]


def test_a_writer_that_opens_the_temporary_file_by_name(tmp_path):
    path = tmp_path / "model.safetensors"  # a path-like works too
    with atomic_write(path, "wb") as f:
        with open(f.name, "wb") as g:  # as safetensors' save_file and gguf's GGUFWriter do
            g.write(b"tensors")
    assert path.read_bytes() == b"tensors"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_it_imports_without_torch():
    """prepare.py's worker processes import it and stay free of torch."""
    code = "import sys, atomic; assert 'torch' not in sys.modules"
    run_python("-c", code, check=True)
