"""A package whose submodule fails to import: the loader names the submodule and the reason."""
