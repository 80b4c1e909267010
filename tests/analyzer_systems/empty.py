"""A module that declares no service: the loader says so."""

ANSWER = 42
