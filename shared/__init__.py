# The sealed smart-meter protocol, sans-IO: bytes in, values out. No sockets,
# clocks or `machine` here; time and randomness are passed in by each role's
# I/O shell. Runs unchanged on CPython and on MicroPython (ESP32 meters).
