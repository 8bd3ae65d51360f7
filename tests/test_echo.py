"""The echo pool prints the data exactly as ``json.dumps(indent=2, sort_keys=True, default=str)``
would, for any data (its own writer is the fast path)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.functions.echo import pretty, render

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
json_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
        st.dictionaries(st.integers(), children, max_size=3),  # keys JSON makes strings of
        st.tuples(children, children)),
    max_leaves=25)
odd = st.one_of(st.binary(max_size=10), st.just(datetime(2026, 1, 2, tzinfo=UTC)),
                st.sets(st.integers(), max_size=3))


def reference(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@settings(max_examples=500, deadline=None)
@given(value=st.one_of(json_like, odd, st.lists(odd, max_size=3)))
def test_the_data_is_printed_as_the_standard_library_prints_it(value: Any) -> None:
    assert pretty(value) == reference(value)
    assert pretty(value, "    ") == "\n    ".join(reference(value).splitlines())


@settings(max_examples=100, deadline=None)
@given(data=json_like)
def test_an_event_is_rendered_attributes_then_indented_data(data: Any) -> None:
    event = CloudEvent({"id": "e-1", "source": "https://vc/sdk", "type": "t", "subject": "S",
                        "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}, data)
    lines = render(event).splitlines()
    assert lines[0] == "CloudEvent S"
    assert "  time: 2026-01-02T03:04:05+00:00" in lines
    at = lines.index("  data:")
    assert lines[at + 1:] == [f"    {line}" for line in reference(data).splitlines()]
