"""Adapters that let other data engines call lmselect (datatrove: :mod:`lmselect.integrations.datatrove`)."""
