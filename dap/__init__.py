"""The DAP (Data Aggregation Point): a gateway between meters and the
head-end that handles only sealed envelopes. It holds no meter keys.

Modules: config (TOML settings), aggregator (when a bundle goes out),
hints (delay tolerance per meter), queue (SQLite disk queue), inbound
(checks on what arrives), stats (counters, status), links (the MQTT
connections), service (the loop that ties them together), check
(`--check`).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
