"""A file written with direct I/O (O_DIRECT): the bytes go from our memory to the device, not through the
page cache.

Why: writing through the page cache costs the writer a copy into freshly allocated cache pages, and in
a VM every fresh page is also a fault in the host. Measured on the CI machine (benchmarks/convert_speed.py,
4 GiB from one reused buffer): buffered writes 0.41-0.85 GiB/s at 4.6-9.6 s of CPU, direct writes
2.0 GiB/s at 0.14 s of CPU; in a 13 GiB conversion the page-cache copy was 55% of all CPU samples. With
direct writes the data is also on the device when the file is closed (no gigabytes left dirty to write
back while the next job starts).

Direct I/O wants each write's memory, file offset and length aligned to the device's block size. So
bytes are gathered in two page-aligned buffers and written a full buffer at a time, by one background
thread while the other buffer fills (os.pwrite releases the GIL); the last, partial buffer is written
padded to the alignment and the file truncated to its true size.
"""
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGNMENT = 4096        # a multiple of every common logical block size (512, 4096)
BUFFER_BYTES = 32 << 20  # per buffer: large writes keep the device busy, two of them bound the memory


def _align_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def open_for_writing(path: str | os.PathLike, direct: bool = True):
    """A new (truncated) file for sequential binary writes: a DirectFile where the file system accepts
    O_DIRECT, else (tmpfs, some FUSE mounts, systems without O_DIRECT, or direct=False) a buffered file."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(path)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    return open(path, "wb")


def _pwrite_all(fd: int, data: memoryview, offset: int, path: str) -> None:
    while data:
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # opened with O_DIRECT, yet a 4096-aligned write refused: a file system wanting larger alignment
            raise OSError(errno.EINVAL, f"the file system refused a direct write of {len(data)} bytes at offset "
                                        f"{offset} (aligned to {ALIGNMENT}); rerun with --no-direct-io", path) from e
        if written <= 0 or (written < len(data) and written % ALIGNMENT):
            # a short direct write leaves the rest misaligned: only a full device or a failed disk does this
            raise OSError(errno.EIO, f"short direct write ({written} of {len(data)} bytes at offset {offset})", path)
        data, offset = data[written:], offset + written


class DirectFile:
    """Sequential writes only (write, tell, flush, fileno, close), as torch.save and torch's checkpoint writer
    make them; seeking raises. A failed background write is raised by the next full buffer's write or by
    close()."""

    def __init__(self, path: str | os.PathLike):
        self.name = str(Path(path))
        self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        self._buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(2)]
        self._current, self._filled = 0, 0  # the buffer being filled and how much of it is
        self._offset = 0                    # file offset of the current buffer's first byte
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self._in_flight: Future | None = None
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            buffer = self._buffers[self._current]
            take = min(len(view) - done, BUFFER_BYTES - self._filled)
            buffer[self._filled:self._filled + take] = view[done:done + take]
            self._filled += take
            done += take
            if self._filled == BUFFER_BYTES:
                self._write_current()
        return len(view)

    def _write_current(self) -> None:
        """Hands the full current buffer to the writer thread and goes on filling the other one."""
        self._wait()
        data = memoryview(self._buffers[self._current])
        self._in_flight = self._writer.submit(_pwrite_all, self._fd, data, self._offset, self.name)
        self._current ^= 1
        self._offset += BUFFER_BYTES
        self._filled = 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def tell(self) -> int:
        return self._offset + self._filled

    def flush(self) -> None:
        """Nothing: the partial last buffer can only be written padded, so it waits for close(). (torch's
        checkpoint writer flushes after every item: writing the tail each time cost 11 s of 15 at 13 GiB.)
        So an fsync of fileno() before close() does not cover the last bytes; megaswift's writer does not
        fsync, and close() returns once every byte is on the device."""

    def _write_tail(self) -> None:
        """The partial buffer, padded to the alignment, at its place; the file then cut to its true size."""
        self._wait()
        if self._filled:
            tail = memoryview(self._buffers[self._current])[:_align_up(self._filled)]
            _pwrite_all(self._fd, tail, self._offset, self.name)
        os.ftruncate(self._fd, self.tell())

    def fileno(self) -> int:
        return self._fd

    def seekable(self) -> bool:
        return False

    def seek(self, *args):
        raise OSError(errno.ESPIPE, "a direct-I/O checkpoint file is written sequentially", self.name)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._write_tail()
        finally:
            self._writer.shutdown(wait=True)
            os.close(self._fd)
            for buffer in self._buffers:
                try:
                    buffer.close()
                except BufferError:  # a failed write's traceback still holds a view of it: freed with it
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
