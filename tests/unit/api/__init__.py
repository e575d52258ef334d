"""Unit tests of the api layer: the models and the CRD, conditions, values."""
