"""From a composed run config to Lightning objects: config composition (backbone settings derived once),
building, checkpoints (incl. sharded folders), stages and results. Above every other layer but the tools."""
