"""Runnable example systems, from the article in shared/ARTICLE.txt: ``choreo up examples/NAME``.

Each example is a package: its services (each runs as its own process), the message types they
exchange, and in ``__init__.py`` what ``choreo up`` starts (``SYSTEM``) and the scenario it
plays (``drive``); see :mod:`choreo.up`. Scenarios:

- ``shop``: a flaky mobile client retries orders under new request ids; each order is placed once.
- ``products``: ProductCreated/ProductUpdated per product, two catalog instances, per-key order.
- ``surge``: ingestion outgrows one consumer; backpressure, bounded lag, a second consumer.
- ``patterns.*``: the article's eight event-driven patterns, one small system each.
"""
