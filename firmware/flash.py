# Files on the meter's flash (littlefs on the ESP32), behind the five calls
# the rest of the firmware needs. Every write is counted, so flash wear per
# day can be reported. Tests substitute a class with the same calls that cuts
# the power part-way through a write.
import os


class Flash:
    def __init__(self, root):
        self.root = root.rstrip("/")
        self.writes = 0  # write calls (appends and whole-file writes)
        self.bytes_written = 0
        try:
            os.mkdir(self.root)
        except OSError:
            pass  # exists

    def _path(self, name):
        return self.root + "/" + name

    def read(self, name):
        """Whole file, or None if it does not exist."""
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def write(self, name, data):
        """Replace a file's contents (not atomic: callers use two slots)."""
        self.writes += 1
        self.bytes_written += len(data)
        with open(self._path(name), "wb") as f:
            f.write(data)

    def append(self, name, data):
        self.writes += 1
        self.bytes_written += len(data)
        with open(self._path(name), "ab") as f:
            f.write(data)

    def remove(self, name):
        try:
            os.remove(self._path(name))
        except OSError:
            pass

    def names(self):
        return os.listdir(self.root)
