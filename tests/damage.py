"""Damage done to a saved file on purpose, as a disk or a copy might do it."""

import json


def flip_a_bit(path, tensor):
    """Flip the lowest bit of the first byte of `tensor` in the safetensors file at `path`: in a
    little-endian float that is the last bit of the mantissa, so the number stays finite and
    nearly the same, and only a checksum can tell."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + header_size])[tensor]["data_offsets"][0]
    data[8 + header_size + begin] ^= 1
    path.write_bytes(bytes(data))
