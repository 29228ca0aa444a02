"""Building blocks of the models. Every layer that owns weights implements `load_weights`."""
