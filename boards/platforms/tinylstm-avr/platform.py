"""The tinylstm AVR platform: everything is in builder/main.py and the board manifests."""

from platformio.public import PlatformBase


class TinylstmavrPlatform(PlatformBase):
    pass
