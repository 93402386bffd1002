"""The store's layout and mapping: offsets from the arguments, the header, sharing across fork.

A store made by one version must open in another (an exec'd master), so the
offsets of the default geometry are pinned here: a change to them is a format
change, and needs a new VERSION.
"""

from __future__ import annotations

import os

import pytest
from forking import exited_ok, fork

from forkgw.shm.layout import (BLOCK_HDR, H_MAGIC, H_VERSION, HEADER, JOURNAL_MAX, MAGIC, MAX_BUCKETS, VERSION,
                               Geometry, Memory, read_args)

DEFAULTS = dict(size=8 << 20, max_key=256, max_value=64 << 10, eviction="lru", max_entries=None, max_queues=256,
                max_metrics=1024, max_metric_name=256, metric_cells=None, slots=64, queue_bytes=None)


def geometry(**kw) -> Geometry:
    return Geometry(**{**DEFAULTS, **kw})


def test_the_default_layout_is_pinned():
    g = geometry()
    assert {k: getattr(g, k) for k in ("top", "ntop", "max_entries", "nbuckets", "slots_at", "journal_at",
                                       "buckets_at", "entries_at", "queues_at", "metrics_at", "names_at",
                                       "bounds_at", "bytejournal_at", "cells_at", "arena_at", "total")} == {
        "top": 17, "ntop": 64, "max_entries": 32768, "nbuckets": 32768, "slots_at": 4096, "journal_at": 4352,
        "buckets_at": 20736, "entries_at": 151808, "queues_at": 1200384, "metrics_at": 1208576,
        "names_at": 1241344, "bounds_at": 1503488, "bytejournal_at": 1765632, "cells_at": 1896704,
        "arena_at": 6094848, "total": 14483456}


@pytest.mark.parametrize("kw", [{}, dict(size=16 << 10, max_key=16, max_value=1000, slots=4),
                                dict(size=1 << 20, max_entries=100, max_queues=3, max_metrics=5, metric_cells=7,
                                     max_metric_name=10, slots=2, queue_bytes=4096)])
def test_regions_follow_the_header_in_order_without_overlap(kw):
    g = geometry(**kw)
    regions = [("slots", g.slots_at, 4 * g.slots), ("journal", g.journal_at, 8 * JOURNAL_MAX),
               ("buckets", g.buckets_at, 4 * g.nbuckets), ("entries", g.entries_at, 32 * g.max_entries),
               ("queues", g.queues_at, 32 * g.max_queues), ("metrics", g.metrics_at, 32 * g.max_metrics),
               ("names", g.names_at, g.max_metrics * g.max_name),
               ("bounds", g.bounds_at, 8 * MAX_BUCKETS * g.max_metrics),
               ("byte journal", g.bytejournal_at, 1 << g.top),
               ("cells", g.cells_at, 8 * g.slots * g.metric_cells), ("arena", g.arena_at, g.ntop << g.top)]
    end = HEADER
    for name, at, size in regions:
        assert at >= end and at % 8 == 0, name
        end = at + size
    assert g.cells_at % 64 == 0 and g.arena_at % 4096 == 0  # cells on cache lines, the arena on pages
    assert g.total % 4096 == 0 and end <= g.total
    assert g.nbuckets >= g.max_entries and g.nbuckets & (g.nbuckets - 1) == 0


def test_the_largest_block_holds_one_maximum_entry_and_no_more_than_needed():
    g = geometry(size=16 << 10, max_key=16, max_value=1000)
    assert g.max_payload == 1 + 255 + 16 + 1000
    assert (1 << g.top) >= g.max_payload + BLOCK_HDR > (1 << (g.top - 1))
    assert g.ntop == (16 << 10) >> g.top and g.queue_bytes == (g.ntop << g.top) // 2
    assert geometry(size=16 << 10, max_key=16, max_value=1000, queue_bytes=0).queue_bytes == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="eviction"):
        geometry(eviction="slru")
    for slots in (1, 4097):
        with pytest.raises(ValueError, match="slots"):
            geometry(slots=slots)
    with pytest.raises(ValueError, match="smaller than one maximum-size entry"):
        geometry(size=100)
    with pytest.raises(ValueError, match="4 GiB"):
        geometry(size=4 << 30)


def test_a_new_mapping_has_a_header_another_process_can_reopen_from():
    g = geometry(size=1 << 20, slots=4)
    mem = Memory(g)
    try:
        assert mem.fresh and mem.W[H_MAGIC] == MAGIC and mem.W[H_VERSION] == VERSION
        pid, _, tag = mem.token.partition(".")
        assert int(pid, 16) == os.getpid() and len(tag) == 8
        assert read_args(mem.fd) == g.args
        again_g = Geometry(**read_args(mem.fd))
        assert vars(again_g) == vars(g)
        again = Memory(again_g, os.dup(mem.fd))
        try:
            assert not again.fresh and again.token == mem.token
            mem.W[g.arena_at >> 2] = 12345
            assert again.W[g.arena_at >> 2] == 12345
        finally:
            again.close()
    finally:
        mem.close()


def test_a_file_that_is_not_a_store_is_refused():
    g = geometry(size=1 << 20)
    fd = os.memfd_create("not-a-store")
    os.ftruncate(fd, g.total)
    with pytest.raises(ValueError, match="not a forkgw store"):
        Memory(g, fd)
    os.close(fd)


def test_the_mapping_is_shared_with_forked_children():
    g = geometry(size=1 << 20)
    mem = Memory(g)
    try:
        at = g.arena_at >> 2

        def child():
            assert mem.W[at] == 7
            mem.W[at] = 8
            mem.Q[g.cells_at >> 3] = -5
            mem.D[(g.cells_at >> 3) + 1] = 0.25

        mem.W[at] = 7
        assert exited_ok(fork(child))
        assert mem.W[at] == 8 and mem.Q[g.cells_at >> 3] == -5 and mem.D[(g.cells_at >> 3) + 1] == 0.25
    finally:
        mem.close()
