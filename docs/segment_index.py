"""What the block indexes of segment files take in memory, read from the files.

Usage: python3 docs/segment_index.py FOLDER

Reads every *.seg under FOLDER (for instance `.braid/bench/checkpoints/files`, which a
`braid bench --checkpoint-interval 10s` run leaves behind) by the format of
crates/braid-state/src/files.rs, and prints the files' bytes, their blocks, and what
their indexes take in memory (`BlockIndex::memory_bytes`) two ways: with every block's
first key and 12 bytes of offsets a block (as braid kept them before separators), and with
separators (the first block's first key, then each block's first key cut after the
first byte where it differs from the last key before it) and 8 bytes a block.
"""

import glob
import struct
import sys

FOOTER_BYTES = 24
MAGIC_BYTES = 8


def leb(data, at):
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def separator(before, key):
    common = 0
    while common < min(len(before), len(key)) and before[common] == key[common]:
        common += 1
    return key[: common + 1]


def main(folder):
    file_bytes = blocks_total = first_key_bytes = separator_bytes = 0
    for path in glob.glob(folder + "/**/*.seg", recursive=True):
        data = open(path, "rb").read()
        data_end, blocks = struct.unpack("<QQ", data[-FOOTER_BYTES:-MAGIC_BYTES])
        at, start, starts = data_end, MAGIC_BYTES, []
        for _ in range(blocks):
            key_len, at = leb(data, at)
            at += key_len
            block_len, at = leb(data, at)
            starts.append(start)
            start += block_len
        last_before = None
        for block, start in enumerate(starts):
            end = starts[block + 1] if block + 1 < len(starts) else data_end
            at, first, last = start, None, None
            while at < end:
                key_len, at = leb(data, at)
                value_len, at = leb(data, at)
                key = data[at : at + key_len]
                at += key_len + value_len
                first = key if first is None else first
                last = key
            first_key_bytes += len(first)
            separator_bytes += len(first if block == 0 else separator(last_before, first))
            last_before = last
        file_bytes += len(data)
        blocks_total += blocks
    if blocks_total == 0:
        sys.exit(f"no segment files under {folder}")
    mib = 1 << 20
    full = first_key_bytes + 12 * blocks_total
    cut = separator_bytes + 8 * blocks_total
    print(f"files {file_bytes / mib:.1f} MiB, {blocks_total} blocks")
    print(f"first keys: {full / mib:.2f} MiB ({full / file_bytes:.2%} of the files), "
          f"{first_key_bytes / blocks_total:.1f} key bytes a block")
    print(f"separators: {cut / mib:.2f} MiB ({cut / file_bytes:.2%} of the files), "
          f"{separator_bytes / blocks_total:.1f} key bytes a block")


if __name__ == "__main__":
    main(sys.argv[1])
