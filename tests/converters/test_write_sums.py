"""hf2mcore sums each file while writing it (converters/mcore_writer.py) and reads every tensor into one reused
buffer: the records must be what reading the files back gives, and a tensor from the reused buffer must
serialize exactly as a tensor of its own."""
import io
import json

import torch

from converters.mcore_writer import ReusedMemory
from megaswift.checkpointing.integrity import FILES_KEY, checksum_file, data_files


def test_records_summed_while_writing_match_the_files(converted_dirs):
    out, _ = converted_dirs("llama", "bf16")
    ckpt = out / "iter_0000000"
    records = json.loads((ckpt / "megaswift.json").read_text())[FILES_KEY]
    assert sorted(records) == data_files(ckpt)
    assert any(name.endswith(".distcp") for name in records)
    for name, recorded in records.items():
        assert checksum_file(ckpt / name) == recorded, name


def test_reused_memory_tensors_serialize_like_their_own():
    memory = ReusedMemory(4096)
    first = memory.empty((8, 16), torch.bfloat16)
    first.copy_(torch.arange(128, dtype=torch.bfloat16).view(8, 16))
    own, reused = io.BytesIO(), io.BytesIO()
    torch.save(first.clone(), own)
    torch.save(first, reused)
    assert reused.getvalue() == own.getvalue()
    assert first.untyped_storage().nbytes() == first.nbytes  # torch's writer would clone a larger storage
    second = memory.empty((4, 4), torch.float32)
    assert second.data_ptr() == first.data_ptr()  # the same memory, reused
    assert memory.empty((2048,), torch.float32).data_ptr() != first.data_ptr()  # too large: its own memory


def test_sum_of_a_large_tensor_taken_from_torchs_record_crc(tmp_path):
    """A tensor of 1 MiB or more is not summed again: its CRC comes from torch.save's zip descriptor."""
    from converters.mcore_writer import _TORCH_RECORD, _SummingFileSystem
    sums = {}
    tensor = torch.randn(_TORCH_RECORD // 2, generator=torch.Generator().manual_seed(0))  # 2 MiB of fp32
    with _SummingFileSystem(sums).create_stream(tmp_path / "data.bin", "wb") as stream:
        stream.write(b"bytes before the record")
        torch.save(tensor, stream)
        stream.write(b"and after")
    assert sums == {"data.bin": checksum_file(tmp_path / "data.bin")}


def test_a_seek_makes_the_sum_unusable(tmp_path):
    """With buffered writes (a direct-I/O file refuses seeks: test_direct_io.py)."""
    from converters.mcore_writer import _SummingFileSystem
    sums = {}
    with _SummingFileSystem(sums, direct=False).create_stream(tmp_path / "data.bin", "wb") as stream:
        stream.write(b"0123456789")
        stream.seek(2)
        stream.write(b"xx")
    assert sums == {}  # integrity.record_files reads such a file back instead
