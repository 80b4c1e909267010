"""One node's logic, in parts with one job each: no sockets, no clocks of its own (time is passed in).

Read top-down, in the order a message meets them (each part imports only those above it; none
imports the engine, which only wires them):

* :mod:`~choreo.runtime.channels`: one outbound and one inbound delivery session per peer
  incarnation (the core's window and reorder buffer, with callbacks and a backlog);
* :mod:`~choreo.runtime.membership`: the peer table and the routing views derived from it;
* :mod:`~choreo.runtime.ownership`: which partitions of its service this node handles;
* :mod:`~choreo.runtime.holds`: the producer's half of a partition move;
* :mod:`~choreo.runtime.lifecycle`, :mod:`~choreo.runtime.stats`: the node's own state, its numbers;
* :mod:`~choreo.runtime.former`: what the node's last life had in flight, for acks that reach its new one late;
* :mod:`~choreo.runtime.outbox`: channels by peer, batching, acks, replies, messages waiting for an instance;
* :mod:`~choreo.runtime.routing`: destinations, emit plans and the compiled emit lane;
* :mod:`~choreo.runtime.calls`: ``emit``/``try_emit``/``send``/``ask``, credit waits, answers
  (a durable node's emits wait for the commit);
* :mod:`~choreo.runtime.probes`, :mod:`~choreo.runtime.rumors`: SWIM's failure detector (whom to
  probe, when silence means suspicion) and its dissemination queue (news piggybacked, O(log n) times);
* :mod:`~choreo.runtime.contacts`: whom gossip talks to directly: hellos, the dial budget, partners,
  partitions held, the dead and stale refusals;
* :mod:`~choreo.runtime.joining`: the seeds asked and the answers waited for, until joined;
* :mod:`~choreo.runtime.gossip`: membership: probes, rumors, anti-entropy, leaving, goodbyes;
* :mod:`~choreo.runtime.moves`: view sync, drain, forward, hand-over, buffered arrivals;
* :mod:`~choreo.runtime.deadletters`: the dead-letter store, and a letter dressed for its replay;
* :mod:`~choreo.runtime.context`: a received message on its way (``Job``) and the handler's context;
* :mod:`~choreo.runtime.owed`: outputs owed for messages another node handled (a standby's
  ungated deltas, a hand-over's running messages): sent should that node go, held by the standby
  until acknowledged;
* :mod:`~choreo.runtime.partdata`: what a partition carries when it moves (dedup ids, results,
  state): exported, installed, a standby's deltas, restored after a restart;
* :mod:`~choreo.runtime.dispatch`: dedup, per-key order, handlers, retries, the ack after the effects;
* :mod:`~choreo.runtime.relief`: a channel whose credit is held by messages waiting for what must
  come back over it: those messages acknowledged, their sender keeping copies;
* :mod:`~choreo.runtime.intake`: received data on its way to the dispatcher: in order, commands
  first, events in turns of the loop;
* :mod:`~choreo.runtime.returns`: what comes back for what this node sent: acks (credit back,
  holds released) and answers (callers resolved, and run before their ack's bookkeeping);
* :mod:`~choreo.runtime.queries`: the system query table and its answers;
* :mod:`~choreo.runtime.engine`: the wiring: the frame table, tick, peers gone,
  reincarnation.

The node on ZeroMQ and asyncio (:mod:`choreo.node`) and the fake-link harness
(:mod:`choreo.testing`) both run an :class:`~choreo.runtime.engine.Engine`.
"""
