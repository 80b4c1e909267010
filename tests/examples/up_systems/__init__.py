"""Small systems that misbehave on purpose, to test ``choreo up`` itself (not examples)."""
