"""The one error type of the converters: it always names the file, the key, what was expected and found."""


class ConversionError(RuntimeError):
    pass
