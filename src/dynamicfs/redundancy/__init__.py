"""Redundancy layer: policies and the codecs that turn an extent into fragments and back."""
