"""`pipeflow bench`: `bench` runs and measures, `figures` holds what it measures,
`render` shows it, `advice` explains it."""
