"""The bottom layer: the errors, configuration types and fixed-point encoding that every other package may import."""
