"""The CPU decode-time ops: C++ sources (built on first use with torch.utils.cpp_extension) and
their launchers — ``linear`` (the tile and packed-panel GEMMs, the [CLS] adapter's deltas),
``attention`` (the decode-step ESS attention), ``controller`` (the fused safety controller) —
and ``decode_linear``, which measures and picks the projection path per number of rows.

May import ``spec`` and ``ops.timing``; each op has a reference twin in ``safekern.reference``
or in the torch path that calls it.
"""
