"""Content hashes of full KV blocks, chained so a hash names the whole prefix up to its block.

    hash(block i) = sha256(hash(block i-1) || token ids of block i)

Two blocks with the same hash hold the same tokens at the same positions after the same prefix, so
their K/V are identical and one can stand for the other. NOTE: sha256 rather than Python's hash():
a collision would silently give a request another prompt's KV, so the guard is a cryptographic
hash (2^-128 odds), not a verification pass on every hit.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        num_blocks: int) -> list[BlockHash]:
    """Grow `hashes` (in place) to cover the first num_blocks full blocks of token_ids."""
    while len(hashes) < num_blocks:
        i = len(hashes)
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes
