"""The range of values a numeric command-line option may take (checked by
``argparser.check_ranges``, declared there and by the method families)."""


class Range:
    """The values a numeric option may take: ``low``/``high`` bounds (``None``: none),
    ``low_open``: the low bound itself is refused; ``warn_at``: a value that is allowed but
    almost surely a mistake, with the reason."""

    def __init__(self, low=None, high=None, low_open=False, warn_at=None):
        self.low, self.high, self.low_open, self.warn_at = low, high, low_open, warn_at

    def problem(self, value):
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"greater than {self.low}" if self.low_open else f"at least {self.low}"
        if self.high is not None and value > self.high:
            return f"at most {self.high}"
        return None

    def text(self):
        if self.high is None:
            return f"greater than {self.low}" if self.low_open else f"at least {self.low}"
        return f"between {self.low} and {self.high}"
