"""The tinylstm Cortex-M platform: everything is in builder/main.py and the board manifests."""

from platformio.public import PlatformBase


class TinylstmarmPlatform(PlatformBase):
    pass
