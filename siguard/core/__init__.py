"""The bottom layer: the errors and configuration types that every other package may import."""
