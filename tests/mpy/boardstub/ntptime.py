# Stand-in for micropython-lib's ntptime: answers with the host's clock, in
# seconds since the port's epoch, and records each query.
import time as _time

import boardlog

host = "pool.ntp.org"
timeout = 1
offset = 0  # seconds added to the answer (to test clock corrections)


def time():
    boardlog.record("ntp", host, timeout)
    t = int(_time.time()) + offset
    if _time.gmtime(0)[0] == 2000:
        t -= 946684800
    return t
