# Stand-in for micropython-lib's umqtt.simple (same constructor and calls):
# a broker that accepts everything, acknowledges every publish at once and
# delivers boardlog.downlinks on check_msg. Records every call.
import boardlog


class MQTTException(Exception):
    pass


class _Sock:
    def read(self, n):
        return None

    def write(self, *args):
        return len(args[0])

    def setblocking(self, flag):
        pass

    def settimeout(self, t):
        pass

    def close(self):
        boardlog.record("mqtt.close")


class MQTTClient:
    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0,
                 ssl=None):
        self.sock = None
        self.cb = None
        self.topic = None
        self.lw = None
        boardlog.record("mqtt.client", client_id, server, port, user, password, keepalive,
                        ssl is not None)

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        self.lw = (topic, msg)
        boardlog.record("mqtt.will", topic, bytes(msg), retain, qos)

    def connect(self, clean_session=True):
        boardlog.record("mqtt.connect", clean_session, self.lw is not None)
        if boardlog.broker_down:
            raise OSError(113)
        self.sock = _Sock()
        return 0

    def subscribe(self, topic, qos=0):
        self.topic = topic
        boardlog.record("mqtt.subscribe", topic, qos)

    def publish(self, topic, msg, retain=False, qos=0):
        boardlog.record("mqtt.publish", topic, bytes(msg), retain, qos)

    def check_msg(self):
        if self.topic is not None and boardlog.downlinks:
            msg = boardlog.downlinks.pop(0)
            boardlog.record("mqtt.deliver", self.topic, len(msg))
            self.cb(self.topic.encode(), msg)
            return 0x32
        return None

    def wait_msg(self):
        return self.check_msg()

    def ping(self):
        boardlog.record("mqtt.ping")

    def disconnect(self):
        boardlog.record("mqtt.disconnect")
