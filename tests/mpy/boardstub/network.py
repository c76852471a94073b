# Stand-in for MicroPython's `network`: a station that connects two polls
# after it is asked to. Records what it is asked.
import boardlog

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_GOT_IP = 1010


class WLAN:
    def __init__(self, iface=STA_IF):
        self._wait = None
        self._up = False
        boardlog.record("wlan", iface)

    def active(self, on=None):
        if on is not None:
            boardlog.record("wlan.active", on)
        return True

    def connect(self, ssid=None, key=None):
        boardlog.record("wlan.connect", ssid, len(key or ""))
        self._wait = 2

    def disconnect(self):
        self._up = False

    def isconnected(self):
        if not self._up and self._wait is not None:
            self._wait -= 1
            if self._wait <= 0:
                self._up = True
        return self._up

    def status(self, *args):
        return STAT_GOT_IP if self._up else STAT_CONNECTING

    def ifconfig(self):
        return ("192.0.2.10", "255.255.255.0", "192.0.2.1", "192.0.2.1")
