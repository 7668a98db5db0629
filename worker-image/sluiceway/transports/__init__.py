"""Brokers behind one seam. See :mod:`sluiceway.transports.base` for the contract and
:mod:`sluiceway.transports.registry` for the one switch from a broker type to its transport."""
