"""The Prometheus text format on its own: names, labels, number formats, families, histograms.

Rendering is a pure function of the samples the registry hands in, so these
tests build samples by hand.
"""

from __future__ import annotations

import math
import re

import pytest

from forkgw.shm import sanitize_name
from forkgw.shm.handles import COUNTER, GAUGE, HISTOGRAM
from forkgw.shm.prometheus import Sample, fmt, label_block, render

SAMPLE_LINE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? \S+$')


@pytest.mark.parametrize("name, expected", [
    ("forkgw_requests_total", "forkgw_requests_total"), ("wasm.my-filter/calls", "wasm_my_filter_calls"),
    ("9lives", "_9lives"), ("", "_"), ("a:b", "a:b"), ("é", "_"),
])
def test_sanitize_name(name, expected):
    assert sanitize_name(name) == expected


def test_label_blocks_are_sorted_sanitized_and_escaped():
    assert label_block(None) == label_block({}) == ""
    assert label_block({"b": 1, "a": 2}) == label_block([("a", 2), ("b", 1)]) == '{a="2",b="1"}'
    assert label_block({"my-key": 1, "1st": 2}) == '{_1st="2",my_key="1"}'
    assert label_block({"v": 'a"b\\c\nd'}) == '{v="a\\"b\\\\c\\nd"}'


def test_numbers():
    assert [fmt(v) for v in (3, -2, 0.5, 1.0, math.inf, -math.inf, math.nan)] == [
        "3", "-2", "0.5", "1.0", "+Inf", "-Inf", "NaN"]


def test_nothing_renders_as_nothing():
    assert render([]) == ""


def test_families_keep_their_first_type_and_order():
    text = render([
        Sample(b'hits{code="200"}', 4, COUNTER, (), 3),
        Sample(b"open", 0, GAUGE, (), -2),
        Sample(b'hits{code="404"}', 4, COUNTER, (), 1),
        Sample(b"hits", 0, GAUGE, (), 7),  # same family name, other type: renamed
    ])
    assert text.splitlines() == [
        "# TYPE hits counter", 'hits{code="200"} 3', 'hits{code="404"} 1',
        "# TYPE open gauge", "open -2",
        "# TYPE hits_gauge gauge", "hits_gauge 7",
    ]


def test_a_histogram_has_cumulative_buckets_a_sum_and_a_count():
    lines = render([Sample(b'up{u="api"}', 2, HISTOGRAM, (0.1, 1.0), ([1, 2, 1], 4, 8.05)),
                    Sample(b"bare", 0, HISTOGRAM, (5.0,), ([0, 0], 0, 0.0))]).splitlines()
    assert lines == [
        "# TYPE up histogram",
        'up_bucket{u="api",le="0.1"} 1', 'up_bucket{u="api",le="1.0"} 3', 'up_bucket{u="api",le="+Inf"} 4',
        'up_sum{u="api"} 8.05', 'up_count{u="api"} 4',
        "# TYPE bare histogram",
        'bare_bucket{le="5.0"} 0', 'bare_bucket{le="+Inf"} 0', "bare_sum 0.0", "bare_count 0",
    ]


def test_any_stored_name_renders_valid_lines():
    names = [b"wasm.my-filter/calls", b"9lives", b"\xff\xfe", b"a b{c}", b'x{k="v"}']
    text = render(Sample(n, 1 if n.startswith(b"x{") else 0, kind, (1.0,), value)
                  for n in names for kind, value in ((COUNTER, 1), (HISTOGRAM, ([1, 0], 1, 0.5))))
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.startswith("# TYPE ") or SAMPLE_LINE.match(line), line
