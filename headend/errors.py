"""The head-end's exception family. Each message names the problem and what
to do about it; the CLI prints it and exits non-zero."""


class HeadEndError(Exception):
    """Base of every error the head-end reports to its user."""


class ConfigError(HeadEndError):
    """A configuration or provisioning file is missing or wrong."""


class UnknownMeterError(HeadEndError):
    """A meter, group or DAP that the registry does not hold."""


class BrokerError(HeadEndError):
    """The MQTT broker could not be reached or refused us."""


class RequestFailed(HeadEndError):
    """A read got no answer within its timeout and retries, or an error status."""
