# The meter's configuration, written by provisioning (`python -m headend
# provision`) as meter.json and copied onto the board. Every problem is
# reported as a ConfigError naming the field and the fix.
import json

_HEX = "0123456789abcdef"


class ConfigError(Exception):
    pass


def _get(cfg, path, kind, default=None, required=True):
    node = cfg
    for part in path.split("."):
        if type(node) is not dict or part not in node:
            if required:
                raise ConfigError("meter.json: '%s' is missing; re-run provisioning "
                                  "(python -m headend provision) for this meter" % path)
            return default
        node = node[part]
    if node is None and not required:
        return default
    if kind is int and (type(node) is not int or node < 0):
        raise ConfigError("meter.json: '%s' must be a non-negative integer" % path)
    if kind is str and type(node) is not str:
        raise ConfigError("meter.json: '%s' must be a string" % path)
    if kind is bool and type(node) is not bool:
        raise ConfigError("meter.json: '%s' must be true or false" % path)
    return node


def _key(cfg, path):
    h = _get(cfg, path, str)
    if len(h) != 64 or any(c not in _HEX for c in h):
        raise ConfigError("meter.json: '%s' must be 64 lowercase hex digits (a 32-byte key)" % path)
    return bytes(int(h[i:i + 2], 16) for i in range(0, 64, 2))


def parse(text):
    """A dict of checked settings from the text of meter.json."""
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise ConfigError("meter.json is not valid JSON (%s); re-provision or fix it" % e)
    if type(cfg) is not dict:
        raise ConfigError("meter.json must hold a JSON object")
    meter = _get(cfg, "meter", int)
    if meter > 0xFFFFFFFF:
        raise ConfigError("meter.json: 'meter' must fit in 32 bits")
    period = _get(cfg, "period", int, 900, False)
    if period <= 0 or 86400 % period:
        raise ConfigError("meter.json: 'period' must divide a day evenly (900 for 15 minutes)")
    out = {
        "meter": meter,
        "secret_key": _key(cfg, "secret_key"),
        "headend_public_key": _key(cfg, "headend_public_key"),
        "dap": _get(cfg, "dap", int, None, False),
        "group": _get(cfg, "group", int, None, False),
        "period": period,
        "host": _get(cfg, "broker.host", str),
        "port": _get(cfg, "broker.port", int, 1883, False),
        "username": _get(cfg, "broker.username", str, None, False),
        "password": _get(cfg, "broker.password", str, None, False),
        "tls": _get(cfg, "broker.tls", bool, False, False),
        "ca": _get(cfg, "broker.ca", str, None, False),
        "ssid": _get(cfg, "wifi.ssid", str, None, False),
        "wifi_password": _get(cfg, "wifi.password", str, None, False),
        "s0_pin": _get(cfg, "s0.pin", int, None, False),
        "s0_export_pin": _get(cfg, "s0.export_pin", int, None, False),
        "pulses_per_kwh": _get(cfg, "s0.pulses_per_kwh", int, 1000, False),
        "nominal_dv": _get(cfg, "voltage.nominal", int, 0, False) * 10,
        "led_pin": _get(cfg, "led.pin", int, None, False),
        "led_active_low": _get(cfg, "led.active_low", bool, False, False),
        "ntp_host": _get(cfg, "ntp.host", str, None, False),
    }
    if out["port"] == 0 or out["port"] > 65535:
        raise ConfigError("meter.json: 'broker.port' must be 1 to 65535")
    if out["pulses_per_kwh"] == 0:
        raise ConfigError("meter.json: 's0.pulses_per_kwh' must be at least 1")
    return out


def load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError("%s not found: copy the provisioned meter.json onto the board "
                          "(make flash METER=<id>)" % path)
    return parse(text)
