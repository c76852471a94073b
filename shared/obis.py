# The quantities a meter reports, named by OBIS code (IEC 62056-61), with
# the small integer tag that stands for each on the wire. Values are integers
# in the unit given, never floats: ESP32 floats are single precision.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


ENERGY_IMPORT = const(1)   # 1.0.1.8.0   active energy import (+A), register, Wh
ENERGY_EXPORT = const(2)   # 1.0.2.8.0   active energy export (-A), register, Wh
POWER = const(3)           # 1.0.1.7.0   instantaneous active power import, W
VOLTAGE = const(4)         # 1.0.32.7.0  instantaneous voltage L1, dV (0.1 V)
INTERVAL_IMPORT = const(5)  # 1.0.1.29.0 active energy import in one interval, Wh
INTERVAL_EXPORT = const(6)  # 1.0.2.29.0 active energy export in one interval, Wh

# tag -> (OBIS code, unit)
CODES = {
    ENERGY_IMPORT: ("1.0.1.8.0", "Wh"),
    ENERGY_EXPORT: ("1.0.2.8.0", "Wh"),
    POWER: ("1.0.1.7.0", "W"),
    VOLTAGE: ("1.0.32.7.0", "dV"),
    INTERVAL_IMPORT: ("1.0.1.29.0", "Wh"),
    INTERVAL_EXPORT: ("1.0.2.29.0", "Wh"),
}

# The registers a current-reading response must carry.
CURRENT_REGISTERS = (ENERGY_IMPORT, ENERGY_EXPORT, POWER, VOLTAGE)
