"""Tensor ops the model families call.

Every op has two implementations with one signature:

- ``reference_*``: plain, obviously-correct torch, the test oracle;
- the unprefixed name: the implementation the engine runs (fused where torch
  offers it, fewer temporaries), which must match the reference in tests.

Modules: :mod:`.attention` (paged KV cache attention), :mod:`.norm`,
:mod:`.rotary`, :mod:`.activation`, :mod:`.sampling`.
"""
