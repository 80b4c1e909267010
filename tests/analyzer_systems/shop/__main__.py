# The loader walks a package's submodules but must never import __main__ (it would run the program).
raise RuntimeError("choreo's loader imported analyzer_systems.shop.__main__")
