"""The article's eight event-driven patterns, each a small system of its own.

Each folder has a README (the problem, how the example solves it, how to run it) and runs with
``choreo up examples/patterns/NAME``: event_notification, event_carried_state, load_leveling,
async_request_reply, claim_check, event_sourcing, cqrs, stream_processing.
"""
