"""The one error a launch raises: its message names the setting, what was expected, what was found, and the fix."""


class LaunchError(RuntimeError):
    """A launch that cannot work; raised before any process starts or any rendezvous is attempted."""
