"""converters/direct_io.py: files written with O_DIRECT hold exactly the bytes written, in any sizes, and
the conversions write the same checkpoint with and without it."""
import errno
import json
import os

import pytest

from converters import hf2mcore, mcore2hf
from converters.direct_io import ALIGNMENT, BUFFER_BYTES, DirectFile, open_for_writing


def _opened_with_o_direct(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
    return bool(flags & os.O_DIRECT)


def _direct_io_supported(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)


@pytest.fixture
def direct_folder(tmp_path):
    if not hasattr(os, "O_DIRECT") or not _direct_io_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    return tmp_path


def test_writes_of_any_size_land_byte_exact(direct_folder):
    """Sizes around the alignment and the buffer, empty writes, one write spanning several buffers; the last
    partial block is padded on disk and cut off again."""
    sizes = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, 7, BUFFER_BYTES - 3, 5, 2 * BUFFER_BYTES + 11, 0, 3]
    chunks = [os.urandom(1) * n if n > 4096 else os.urandom(n) for n in sizes]
    expected = b"".join(chunks)
    path = direct_folder / "data.bin"
    with open_for_writing(path) as f:
        assert isinstance(f, DirectFile) and _opened_with_o_direct(f.fileno())
        for chunk in chunks:
            assert f.write(memoryview(chunk)) == len(chunk)
            f.flush()  # torch's writer flushes after every item: must not break alignment
        assert f.tell() == len(expected)
    assert path.stat().st_size == len(expected) and path.read_bytes() == expected


def test_seek_is_refused_with_the_file_named(direct_folder):
    with open_for_writing(direct_folder / "data.bin") as f:
        f.write(b"abc")
        with pytest.raises(OSError, match="written sequentially") as error:
            f.seek(0)
    assert error.value.errno == errno.ESPIPE and error.value.filename.endswith("data.bin")


def test_a_failed_background_write_is_raised(direct_folder):
    """A write that fails in the writer thread (here: its file descriptor closed under it) is raised to the
    writer by the next full buffer or by close(), never lost."""
    f = open_for_writing(direct_folder / "data.bin")
    os.close(f.fileno())
    with pytest.raises(OSError) as error:
        f.write(b"x" * (2 * BUFFER_BYTES + 1))  # the second full buffer waits for the first's failed write
        f.close()
    assert error.value.errno == errno.EBADF


def test_buffered_where_not_wanted_or_refused(tmp_path, monkeypatch):
    plain = open_for_writing(tmp_path / "plain.bin", direct=False)
    assert not isinstance(plain, DirectFile)
    plain.close()
    # A file system refusing O_DIRECT (older tmpfs, some FUSE mounts) answers EINVAL; none is at hand here
    # (this kernel's tmpfs accepts it), so the refusal is the one thing simulated.
    real_open = os.open

    def refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refusing_direct)
    with open_for_writing(tmp_path / "refused.bin") as f:
        assert not isinstance(f, DirectFile)
        f.write(b"abc")
    assert (tmp_path / "refused.bin").read_bytes() == b"abc"
    monkeypatch.setattr(os, "open", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # any other failure is the user's to see
        open_for_writing(tmp_path / "denied.bin")


def test_conversions_write_the_same_bytes_with_and_without_direct_io(hf_model_dirs, tmp_path):
    if not _direct_io_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    hf = hf_model_dirs("llama", "bf16")
    outputs = {}
    for direct in (True, False):
        mcore = tmp_path / f"mcore-{direct}"
        hf2mcore(hf, mcore, verify=False, progress=False, direct_io=direct)
        back = tmp_path / f"back-{direct}"
        mcore2hf(mcore, back, verify=False, progress=False, direct_io=direct)
        ckpt = mcore / "iter_0000000"
        outputs[direct] = ({p.name: p.read_bytes() for p in ckpt.glob("*.distcp")},
                           # the data files' records (.metadata names the folder, which differs here)
                           {k: v for k, v in json.loads((ckpt / "megaswift.json").read_text())["files"].items()
                            if k != ".metadata"},
                           {p.name: p.read_bytes() for p in back.glob("*.safetensors")})
    assert outputs[True] == outputs[False]
    assert outputs[True][0] and outputs[True][2]


def test_a_refused_direct_write_says_what_to_do(direct_folder, monkeypatch):
    """A file system that opens with O_DIRECT but wants a larger alignment refuses the write itself (EINVAL;
    simulated, none is at hand): the error names the file and the way out."""
    def refusing(*args):
        raise OSError(errno.EINVAL, "Invalid argument")
    f = open_for_writing(direct_folder / "data.bin")
    monkeypatch.setattr(os, "pwrite", refusing)
    with pytest.raises(OSError, match="--no-direct-io") as error:
        f.write(b"x" * 5)
        f.close()
    assert error.value.filename.endswith("data.bin")
