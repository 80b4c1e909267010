"""Claim check: put the large payload in a blob store and send only a reference to it.

    choreo up examples/patterns/claim_check
"""

from .uploader import drive

SYSTEM = {"indexer": 2}
CLIENT = "uploader"
