# The meter firmware: exactly the files that go onto an ESP32 (with the
# shared/ modules they import). main.py is the board's entry point.
