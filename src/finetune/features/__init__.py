"""The feature cache: the frozen part of the network run once, its output served to the trained part."""
