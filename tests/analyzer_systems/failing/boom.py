raise RuntimeError("boom: this submodule cannot be imported")
