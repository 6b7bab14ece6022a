"""Checks of a composed configuration against the constructors it will call, before any work starts."""
