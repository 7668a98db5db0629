"""What the operator reads from a queue's broker, one module per broker (KEDA's scaler shape).

- :mod:`.base`: the :class:`~.base.BacklogSource` protocol and the :class:`~.base.Backlog` it reads;
- :mod:`.registry`: the one switch from a broker type to its source, imported lazily;
- :mod:`.redis`: the Redis broker's source.

``scaling.decide()`` never sees a broker: ``observe.py`` turns a backlog and the workers'
heartbeats (coordination, on Redis for every broker) into a pure ``Observation``.
"""
