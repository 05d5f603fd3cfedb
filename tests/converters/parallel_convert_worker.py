"""Under torchrun (2 ranks), through the CLI: `megaswift convert hf2mcore` twice, first with a read failure
injected on rank 1 only (a share's tensor that cannot be read), which must end both ranks with rank 1's error
and leave no output, then the real conversion into OUT_GOOD; then `mcore2hf` of it into BACK in small shards,
spread over both ranks. Exits 0 when all went as expected."""
import os
import sys

from converters.errors import ConversionError
from converters.hf_reader import HfCheckpointReader
from megaswift.cli.main import main

INJECTED = "injected read failure"


def failing_on_rank_1(original):
    def read_rows_into(self, key, blocks, out):
        raise ConversionError(f"{self.file_of[key]}: cannot read tensor {key!r}: {INJECTED}")
    return read_rows_into if os.environ["RANK"] == "1" else original


if __name__ == "__main__":
    hf_dir, out_failed, out_good, back, shard_size = sys.argv[1:]
    original = HfCheckpointReader.read_rows_into
    HfCheckpointReader.read_rows_into = failing_on_rank_1(original)
    failed = main(["convert", "hf2mcore", hf_dir, out_failed, "--no-progress"])
    HfCheckpointReader.read_rows_into = original
    converted = main(["convert", "hf2mcore", hf_dir, out_good, "--no-progress"])
    exported = main(["convert", "mcore2hf", out_good, back, "--no-progress", "--max-shard-size", shard_size])
    print(f"rank {os.environ['RANK']}: exit codes {failed} {converted} {exported}", flush=True)
    sys.exit(0 if (failed, converted, exported) == (1, 0, 0) else 1)
