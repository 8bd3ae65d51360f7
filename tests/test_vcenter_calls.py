"""Every SOAP call a producer session makes is counted per method and exported as
``vebaq_producer_vcenter_calls_total{method,vcenter}`` (what the producer costs each vCenter)."""

from __future__ import annotations

from prometheus_client import generate_latest

from producer import vcenter
from producer.metrics import ProducerMetrics
from producer.reader import EventReader, SeenKeys
from vebaq.core import config


def test_a_sessions_calls_are_counted_per_method(vcsim: str) -> None:
    settings = config.load(environ={"VCENTER_URL": vcsim, "VCENTER_USER": "vebaq",
                                    "VCENTER_PASSWORD": "pw"}).vcenter
    before = dict(vcenter.CALLS)
    session = vcenter.connect(settings)
    try:
        reader = EventReader(session.content, begin=session.now(), seen=SeenKeys())
        reader.open()
        reader.poll()
        reader.close()
        session.si.content.about.apiVersion  # noqa: B018 - a property read: Fetch
    finally:
        session.close()
    made = {method: count - before.get((url, method), 0)
            for (url, method), count in vcenter.CALLS.items()
            if count != before.get((url, method), 0) and url == vcsim}
    assert made["CurrentTime"] == 1  # session.now()
    assert made["CreateCollectorForEvents"] == 1 and made["DestroyCollector"] == 1
    assert made["ReadNextEvents"] >= 1 and made["RetrievePropertiesEx"] >= 1
    assert made["Fetch"] >= 1
    text = generate_latest(ProducerMetrics().registry).decode()
    assert (f'vebaq_producer_vcenter_calls_total{{method="ReadNextEvents",vcenter="{vcsim}"}} '
            f'{float(vcenter.calls("ReadNextEvents", vcsim))}') in text
