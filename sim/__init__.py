"""Local simulation: many host meters running the firmware's meter core over
paho-mqtt, and the scenario runner behind `make sim`."""
