"""Checks of a cxl tier's bookkeeping, shared by the tests that share regions between stores."""


def assert_exact_accounting(tier):
    """No two indexed objects share bytes or a slot, and the bytes the allocator holds free plus
    those the index holds make the data area."""
    extents = sorted((e.loc[1], tier.allocator.rounded(e.size)) for e in tier.index.values())
    for (a, n), (b, _) in zip(extents, extents[1:]):
        assert a + n <= b, "two objects share bytes"
    assert tier.used == sum(e.size for e in tier.index.values())
    assert tier.allocator.free_bytes + sum(n for _, n in extents) == tier.allocator.capacity
    assert len({e.loc[0] for e in tier.index.values()}) == len(tier.index)
