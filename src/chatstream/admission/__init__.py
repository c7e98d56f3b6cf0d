"""Admission: who may generate now, one admitted generation, and the Prometheus metrics of both.

``admission`` hands out slots (a fixed number of concurrent generations, a bounded FIFO waiting queue), ``generation``
runs one admitted generation against the engine, ``metrics`` records what happened.
"""
