"""Mask expansion (PRG) and vectorised arithmetic in Z_{2^b}.

A 32-byte seed keys AES-256 in CTR mode (from ``cryptography``) with a zero IV; each seed is used
for exactly one mask, because every seed is derived with the run, round and site ids in its HKDF
info. The keystream's raw little-endian words are the mask: uniform over Z_{2^32} (or Z_{2^64}),
and masking the low ``b`` bits gives a uniform value of Z_{2^b} with no modulo bias, since 2^b
divides the word size. Arithmetic uses numpy's native unsigned wraparound.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .quantize import storage_dtype

__all__ = ["MaskAccumulator", "element_bytes", "pack_vector", "unpack_vector"]

_CHUNK_BYTES: Final = 1 << 20  # keystream is produced and added in 1 MiB pieces
_ZERO_IV: Final = bytes(16)


def element_bytes(bits: int) -> int:
    """Bytes per element of a masked vector on the wire."""
    return (bits + 7) // 8


class MaskAccumulator:
    """A vector in Z_{2^bits} to which masks are added or subtracted in place."""

    def __init__(self, num_elements: int, *, bits: int) -> None:
        self.bits = bits
        self.values: npt.NDArray[np.unsignedinteger] = np.zeros(
            num_elements, dtype=storage_dtype(bits)
        )
        self._word_bytes = self.values.dtype.itemsize
        self._zeros = bytes(
            max(self._word_bytes, min(_CHUNK_BYTES, num_elements * self._word_bytes))
        )
        self._out = bytearray(len(self._zeros) + 15)  # update_into needs block_size - 1 spare

    def add(self, vector: npt.NDArray[np.unsignedinteger]) -> None:
        """Add a vector of the same length (values already reduced mod 2^bits)."""
        self.values += vector.astype(self.values.dtype, copy=False)

    def add_mask(self, seed: bytes, *, negate: bool = False) -> None:
        """Add (or subtract) the mask expanded from ``seed``."""
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
        dtype = self.values.dtype.newbyteorder("<")
        per_chunk = len(self._zeros) // self._word_bytes
        for start in range(0, self.values.size, per_chunk):
            count = min(per_chunk, self.values.size - start)
            nbytes = count * self._word_bytes
            written = encryptor.update_into(memoryview(self._zeros)[:nbytes], self._out)
            words = np.frombuffer(self._out, dtype=dtype, count=written // self._word_bytes)
            target = self.values[start : start + count]
            if negate:
                target -= words
            else:
                target += words

    def reduced(self) -> npt.NDArray[np.unsignedinteger]:
        """The values reduced modulo 2^bits (a no-op for bits = 32 and 64)."""
        word_bits = self._word_bytes * 8
        if self.bits < word_bits:
            self.values &= self.values.dtype.type((1 << self.bits) - 1)
        return self.values


def pack_vector(values: npt.NDArray[np.unsignedinteger], *, bits: int) -> bytes:
    """Little-endian, ``element_bytes(bits)`` bytes per element."""
    width = element_bytes(bits)
    words = values.astype(values.dtype.newbyteorder("<"), copy=False)
    if width == words.dtype.itemsize:
        return words.tobytes()
    as_bytes = words.view(np.uint8).reshape(-1, words.dtype.itemsize)
    return as_bytes[:, :width].tobytes()


def unpack_vector(data: bytes, *, bits: int) -> npt.NDArray[np.unsignedinteger] | None:
    """Inverse of :func:`pack_vector`; ``None`` if the length or the padding bits are wrong."""
    width = element_bytes(bits)
    if len(data) % width:
        return None
    dtype = np.dtype(storage_dtype(bits)).newbyteorder("<")
    if width == dtype.itemsize:
        words = np.frombuffer(data, dtype=dtype)
    else:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
        padded = np.zeros((raw.shape[0], dtype.itemsize), dtype=np.uint8)
        padded[:, :width] = raw
        words = padded.view(dtype).ravel()
    if bits < dtype.itemsize * 8 and np.any(words >> dtype.type(bits)):
        return None
    return words
