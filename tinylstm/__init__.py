"""tinylstm: from sensor data to an integer LSTM running on a microcontroller."""

__version__ = "0.1.0"
