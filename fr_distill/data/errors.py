"""The data package's exception: bad training data reported in one line naming the file/record."""
from __future__ import annotations


class DataError(ValueError):
    """Unusable training data; the message is one line naming the file, record or key."""
