"""The DAP (Data Aggregation Point): a gateway between meters and the
head-end that handles only sealed envelopes. It holds no meter keys.

Modules: config (TOML settings), aggregator (when a bundle goes out),
hints (delay tolerance per meter), queue (SQLite disk queue), inbound
(checks on what arrives), stats (counters, status), service (the MQTT
shell), check (`--check`).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
