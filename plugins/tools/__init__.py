"""The builtin tool-call parsers, one plugin per model family's markup (``--tool-call-parser NAME``).

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Hermes, Qwen2.5, Qwen3);
- ``llama3_json``: ``{"name": ..., "parameters": {...}}``, several joined by ``; `` (Llama 3.1 / 3.2 JSON);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` and ``[TOOL_CALLS]name{...}``;
- ``pythonic``: ``[get_weather(city="Paris"), ...]`` (Llama 3.2 / 4 pythonic).

Each module is a plugin of its own (an entry point in patchbay's pyproject), registering
through ``register_tool_parsers`` exactly as a third-party package does. :mod:`.markup`
holds what the marker-based formats share (held-back partial markers, the grammar of
tagged calls). The contract is :mod:`patchbay.tools`.
"""
