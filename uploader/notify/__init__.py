"""Completion notifications: recorded exactly once, delivered at least once.

An upload may ask to be told when it ends (request options, validated in :mod:`.targets`):

- ``callback_url`` (with ``callback_vars``): an HTTP POST of the result as JSON, signed
  (:mod:`.signature`), to an address the outbound guard allows (:mod:`uploader.outbound`);
- ``on_complete`` / ``on_failure`` (with ``callback_queue``): a Celery task sent by name with the
  result as its kwargs (:mod:`.task`).

The terminal transitions write one outbox event per channel in the same Lua script that changes
the state (:mod:`uploader.checkpoint.outbox`): completed, failed for good (not a failure with an
automatic resume to come), cancelled. Every worker runs a :class:`~.notifier.NotifierLoop` that
claims due events with a lease, delivers them, and records each attempt; an event whose notifier
died is claimed again when its lease lapses. The payload (:mod:`.payload`) is built from the
record at delivery time, so events stay small.
"""
